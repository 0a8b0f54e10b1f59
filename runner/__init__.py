"""runner: an experiment runner for PyTorch.

`python -m runner <overrides>` composes a config with Hydra, validates it, launches workers with
torch's elastic agent, trains, and keeps verified snapshots so that any failure or re-invocation
resumes exactly where training stood.
"""

__version__ = "0.1.0"
