"""Hyperparameter search that survives being interrupted: Hydra's Optuna sweeper, resumed from the
run directories it already produced.

Hydra's Optuna sweeper starts `n_trials` new trials every time. Here the search's record is its
run directories: every trial is a run like any other, whose status.json holds its overrides, how
it ended and its objective. Starting the same search again reads them back: finished and failed
trials are told to the study (so the sampler learns from them and they are not run again), trials
that were interrupted are asked again with the same parameters (their run directories resume from
their snapshots), and only the trials still missing are run. A trial whose job fails or diverges
returns NaN and is recorded as failed, never as the best. The closing table lists the trials read
back too. The direction follows `snapshot.mode` (the objective is the best `snapshot.monitor`) unless
`hydra.sweeper.direction` is given; one that disagrees with it is refused before the first trial.

It lives in the `hydra_plugins` namespace because Hydra instantiates sweepers only from there;
without hydra-optuna-sweeper installed it defines nothing (Hydra imports every plugin module).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pip install "hydra-torch-runner[search]"
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
        trial = {
            "params": params,
            "state": state,
            "value": status.get("objective"),
            "dir": status_file.parent.name,
            "status": status,
        }
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


def search_direction(given: Any, monitor: Optional[str], mode: Any) -> str:
    """Which way the objective improves. It is the best `snapshot.monitor` value when one is set (so
    `snapshot.mode` says which way), else the final training loss (minimize). A `given` direction
    (hydra.sweeper.direction) that disagrees with snapshot.mode would rank the worst trial best."""
    from runner.errors import UserError

    mode = str(getattr(mode, "value", mode))
    follows = ("maximize" if mode == "max" else "minimize") if monitor else "minimize"
    if given is None:
        return follows
    name = str(getattr(given, "name", given))
    if monitor and name != follows:
        raise UserError(
            "hydra.sweeper.direction",
            name,
            f"each trial's objective is its best {monitor}, and "
            f"snapshot.mode={mode} says {'higher' if mode == 'max' else 'lower'} is better, so "
            f"{name[:-1]}ing it would rank the worst trial best",
            f"{follows}, or no hydra.sweeper.direction (it follows snapshot.mode)",
            f"drop hydra.sweeper.direction, or set snapshot.mode={'min' if mode == 'max' else 'max'} "
            f"if {monitor} improves the other way",
        )
    return name


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
        if isinstance(impl.direction, (list, tuple)) or OmegaConf.is_list(impl.direction):
            directions = impl._get_directions()  # several objectives: the user's own task function
        else:
            directions = [_checked_direction(impl)]
        study = optuna.create_study(
            study_name=impl.study_name,
            storage=impl.storage,
            sampler=impl.sampler,
            directions=directions,
            load_if_exists=True,
        )
        sweep_dir = Path(impl.config.hydra.sweep.dir)
        done, interrupted = past_trials(sweep_dir, distributions, fixed)
        known = {json.dumps(t.params, sort_keys=True) for t in study.trials}
        with warnings.catch_warnings():  # add_trial and enqueue_trial are stable in use, "experimental" by name
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for trial in done:
                if json.dumps(trial["params"], sort_keys=True) in known:
                    continue
                value = trial["value"]
                value = value if isinstance(value, (int, float)) and math.isfinite(value) else None
                state = TrialState.COMPLETE if trial["state"] == "COMPLETE" and value is not None else TrialState.FAIL
                study.add_trial(
                    create_trial(
                        params=trial["params"],
                        distributions=distributions,
                        state=state,
                        value=value if state == TrialState.COMPLETE else None,
                    )
                )
            for trial in interrupted:
                study.enqueue_trial(trial["params"])
        if done and hasattr(impl.sampler, "reseed_rng"):
            impl.sampler.reseed_rng()  # a seeded sampler would propose the finished trials' parameters again
        remaining = max(impl.n_trials - len(done), 0)
        from runner.driver import sweep as sweep_table

        for num, trial in enumerate(done):  # the closing table lists every trial of the search
            sweep_table.add_row(sweep_dir / trial["dir"], {**trial["status"], "job_num": num, "earlier": True})
        impl.job_idx = max(impl.job_idx, len(done))
        if done or interrupted:
            log.info(
                "search: %d of %d trials already done in %s%s; running %d more",
                len(done),
                impl.n_trials,
                sweep_dir,
                f", {len(interrupted)} interrupted (they resume)" if interrupted else "",
                remaining,
            )

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
        OmegaConf.save(
            OmegaConf.create(
                {
                    "name": "optuna",
                    "best_params": best.params,
                    "best_value": best.value,
                    "trials": len(study.trials),
                    "complete": len(complete),
                }
            ),
            sweep_dir / "optimization_results.yaml",
        )


def _checked_direction(impl) -> str:
    """The search's direction, or the one-paragraph error and exit 2 before any trial starts."""
    from runner.errors import EXIT_USER_ERROR, UserError, full_errors_requested, report_user_error

    snapshot = impl.config.get("snapshot") or {}
    try:
        return search_direction(impl.direction, snapshot.get("monitor"), snapshot.get("mode", "min"))
    except UserError as err:
        if full_errors_requested():
            raise
        report_user_error(err)
        raise SystemExit(EXIT_USER_ERROR) from None


if OptunaSweeper is not None:

    class ResumableOptunaSweeper(_ResumableOptunaSweeper, OptunaSweeper):
        """hydra/sweeper=optuna that continues its search instead of starting `n_trials` anew."""
