"""Hyperparameter search that survives being interrupted: Hydra's Optuna sweeper, resumed from the
run directories it already produced.

Hydra's Optuna sweeper starts `n_trials` new trials every time. Here the search's record is its
run directories: every trial is a run like any other, whose status.json holds its overrides, how
it ended and its objective. Starting the same search again reads them back: finished and failed
trials are told to the study (so the sampler learns from them and they are not run again), trials
that were interrupted are asked again with the same parameters (their run directories resume from
their snapshots), and only the trials still missing are run. A trial whose job fails or diverges
returns NaN and is recorded as failed, never as the best.

It lives in the `hydra_plugins` namespace because Hydra instantiates sweepers only from there;
without hydra-optuna-sweeper installed it defines nothing (Hydra imports every plugin module).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pip install "runner[search]"
    OptunaSweeper = None

DONE = {"finished": "COMPLETE", "failed": "FAIL", "diverged": "FAIL", "invalid config": "FAIL"}


def past_trials(sweep_dir: Path, distributions: dict, fixed: dict) -> tuple[list[dict], list[dict]]:
    """(done, interrupted) trials of this search found under `sweep_dir`: runs whose overrides set
    every searched key and every fixed override to the same value."""
    done, interrupted = [], []
    for status_file in sorted(sweep_dir.glob("*/status.json")):
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            continue
        given = dict(o.split("=", 1) for o in status.get("overrides") or [] if "=" in o)
        if not set(distributions) <= set(given) or any(given.get(k) != str(v) for k, v in fixed.items()):
            continue
        params = {k: _external(distributions[k], given[k]) for k in distributions}
        if any(v is None for v in params.values()):
            continue
        state = DONE.get(status.get("status"))
        trial = {"params": params, "state": state, "value": status.get("objective"), "dir": status_file.parent.name}
        (done if state else interrupted).append(trial)
    return done, interrupted


def _external(distribution: Any, text: str) -> Any:
    """An override's value as the distribution's parameter value (None if it is not one of them)."""
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return next((c for c in choices if str(c) == text), None)
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if type(distribution).__name__.startswith("Int") else value


class _ResumableOptunaSweeper:
    def sweep(self, arguments: List[str]) -> None:
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
        from optuna.trial import TrialState, create_trial

        impl = self.sweeper
        impl._process_searchspace_config()
        params_conf = impl._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        distributions.update(impl.search_space_distributions or {})
        for name in fixed:
            distributions.pop(name, None)
        directions = impl._get_directions()
        study = optuna.create_study(study_name=impl.study_name, storage=impl.storage, sampler=impl.sampler,
                                    directions=directions, load_if_exists=True)
        sweep_dir = Path(impl.config.hydra.sweep.dir)
        done, interrupted = past_trials(sweep_dir, distributions, fixed)
        known = {json.dumps(t.params, sort_keys=True) for t in study.trials}
        for trial in done:
            if json.dumps(trial["params"], sort_keys=True) in known:
                continue
            value = trial["value"] if isinstance(trial["value"], (int, float)) and math.isfinite(trial["value"]) else None
            state = TrialState.COMPLETE if trial["state"] == "COMPLETE" and value is not None else TrialState.FAIL
            study.add_trial(create_trial(params=trial["params"], distributions=distributions, state=state,
                                         value=value if state == TrialState.COMPLETE else None))
        for trial in interrupted:
            study.enqueue_trial(trial["params"])
        if done and hasattr(impl.sampler, "reseed_rng"):
            impl.sampler.reseed_rng()  # a seeded sampler would propose the finished trials' parameters again
        remaining = max(impl.n_trials - len(done), 0)
        if done or interrupted:
            log.info("search: %d of %d trials already done in %s%s; running %d more", len(done), impl.n_trials, sweep_dir,
                     f", {len(interrupted)} interrupted (they resume)" if interrupted else "", remaining)

        while remaining > 0:
            batch = min(remaining, impl.n_jobs)
            trials = [study.ask() for _ in range(batch)]
            overrides = impl._configure_trials(trials, distributions, fixed)
            returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
            impl.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                value = self._value(ret)
                if value is None:
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
            remaining -= batch
        self._save_results(study, sweep_dir)

    @staticmethod
    def _value(ret) -> Optional[float]:
        """The job's objective, or None when the job failed (raised, or returned NaN)."""
        try:
            value = float(ret.return_value)
        except Exception as err:  # the job raised (JobReturn re-raises it) or returned nothing usable
            log.warning("trial failed: %s", err)
            return None
        return value if math.isfinite(value) else None

    @staticmethod
    def _save_results(study, sweep_dir: Path) -> None:
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        if not complete:
            log.warning("search: no trial finished")
            return
        best = study.best_trial
        log.info("search: best value %s with %s", best.value, best.params)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value,
                                         "trials": len(study.trials), "complete": len(complete)}),
                       sweep_dir / "optimization_results.yaml")


if OptunaSweeper is not None:
    class ResumableOptunaSweeper(_ResumableOptunaSweeper, OptunaSweeper):
        """hydra/sweeper=optuna that continues its search instead of starting `n_trials` anew."""
