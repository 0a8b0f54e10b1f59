"""runner.report on run directories written by hand: the table's layout and width, step-counted
runs, and per-step rows kept out of the epoch numbers but drawn as the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from runner import report


def make_run(root: Path, name: str, overrides: list[str], rows: list[dict], max_steps: int = 0) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    config = {"trainer": {"total_epochs": 20, "max_steps": max_steps}, "snapshot": {"mode": "min"}}
    OmegaConf.save(OmegaConf.create(config), run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def step_row(step: int, loss: float) -> dict:
    return {"scope": "step", "epoch": 0, "step": step, "train/loss": loss, "lr": 0.1, "samples_per_s": 1e4, "time": 1.0}


def test_numbers_come_first_and_the_table_fits_120_columns(tmp_path):
    long_overrides = [f"model.layer_{i}.hidden_size={100 + i}" for i in range(6)]
    for n in range(3):
        make_run(
            tmp_path,
            f"model=mlp,optimizer.lr=0.{n}1,optimizer.weight_decay=0.0001,scheduler=cosine-{'x' * 40}",
            [*long_overrides, f"optimizer.lr=0.{n}1", f"optimizer.weight_decay=0.000{n}1"],
            [{"epoch": 1, "step": 32, "train/loss": 0.5 - n / 10, "val/accuracy": 0.9, "epoch_seconds": 1.5}],
        )
    text = report.table([report.load_run(d) for d in report.find_runs(tmp_path)])
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, text
    assert lines[0].split()[:5] == ["run", "final", "loss", "best", "loss"] and lines[0].rstrip().endswith("overrides")
    names = [line.split()[0] for line in lines[1:]]  # long names cut, from where they start to differ
    assert (
        all(name.startswith("model...") for name in names) and ["0.01," in names[0], "0.11," in names[1]] == [True] * 2
    )
    assert "0.4" in lines[2] and "0.9" in lines[2] and "1/20 epochs" in lines[2] and "1.5" in lines[2]


def test_a_max_steps_run_counts_steps_and_step_rows_stay_out_of_the_epoch_numbers(tmp_path):
    rows = [
        step_row(10, 9.0),
        step_row(20, 0.01),  # per-step rows: a lower loss than any epoch's mean
        {"epoch": 1, "step": 32, "train/loss": 2.0, "val/loss": 1.5, "epoch_seconds": 2.0},
        step_row(40, 5.0),
        step_row(60, 0.02),
        {"epoch": 1, "step": 60, "train/loss": 1.0, "val/loss": 1.25, "epoch_seconds": 1.0},
    ]
    stepped = report.load_run(make_run(tmp_path, "lm", ["experiment=charlm"], rows, max_steps=60))
    assert stepped["final_loss"] == 1.0 and stepped["best_loss"] == 1.0 and stepped["wall"] == 3.0
    assert stepped["val"] == {"val/loss": 1.25} and stepped["status"] == "finished"
    epochs = report.load_run(make_run(tmp_path, "reg", ["model=mlp"], [{"epoch": 3, "step": 96, "train/loss": 0.5}]))
    text = report.table([stepped, epochs])
    assert "60/60 steps" in text and "3/20 epochs" in text and "/20 epochs" not in text.splitlines()[1]
    assert "partial" in text.splitlines()[2]

    x_name, lines = report.curves([stepped, epochs])
    assert x_name == "optimizer step"
    assert lines[0][1:] == ([10, 20, 40, 60], [9.0, 0.01, 5.0, 0.02])  # the per-step rows make the curve
    assert lines[1][1:] == ([96], [0.5])  # a run without them: its epoch rows, at their steps
    assert report.curves([epochs])[0] == "epoch"
