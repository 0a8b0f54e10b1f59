"""Launching: how workers start (start.py), the runtime decision (runtime.py), and the elastic
agent or in-process start (elastic.py). Nothing is imported here: `start` runs first thing in the
driver, before torch or Hydra are loaded."""
