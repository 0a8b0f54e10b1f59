"""Launching: the runtime decision (runtime.py) and the elastic agent or in-process start (elastic.py)."""

from runner.launch.elastic import launch
from runner.launch.runtime import Runtime, resolve_runtime

__all__ = ["Runtime", "launch", "resolve_runtime"]
