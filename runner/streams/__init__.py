"""Data that streams from shard files: the sharding rule (plan), the resumable iterable dataset
(base) and the built-in sources (sources, hf)."""
