"""Makes conf/ importable as `runner.conf`, so Hydra finds it (pkg://runner.conf) in any install."""
