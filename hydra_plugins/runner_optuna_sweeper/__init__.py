"""Hydra plugin: a resumable Optuna sweeper (conf/hparams_search/)."""
