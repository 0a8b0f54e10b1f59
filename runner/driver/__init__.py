"""The driver process: compose and check the config (Hydra glue, checks), own the run directory
(its name and identity, the lock, status for sweeps), launch, and report how the job ended."""
