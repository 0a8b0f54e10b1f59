"""Launching: the runtime decision (runtime.py) and the elastic agent or in-process start (elastic.py)."""

from runner.launch.elastic import launch
from runner.launch.runtime import resolve_runtime

__all__ = ["launch", "resolve_runtime"]
