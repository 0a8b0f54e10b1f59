"""runner: an experiment runner for PyTorch.

`python -m runner <overrides>` composes a config with Hydra, validates it, launches workers with
torch's elastic agent, trains, and keeps verified snapshots so that any failure or re-invocation
resumes exactly where training stood.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use below, so that `import runner` stays cheap (no torch, no hydra)
    from runner.export import load_model  # noqa: F401 (for type checkers: runner.load_model)


def __getattr__(name: str):
    if name == "load_model":
        from runner.export import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load_model"])
