"""runner.report on run directories written by hand: the table's layout and width, step-counted
runs, and per-step rows kept out of the epoch numbers but drawn as the loss curve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
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


def observed_row(step: int, loss: float, **extra) -> dict:
    row = step_row(step, loss)
    row.update({"tflops": 0.5 + step / 1000, "time/data": 0.2, "time/step": 1.0, "memory/rss_mb": 300.0 + step})
    row.update(extra)
    return row


def colour_pixels(png: Path, colour: str) -> int:
    """Pixels of a PNG within a small distance of `colour` (a matplotlib colour name such as C0)."""
    import matplotlib.colors
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(png)[..., :3]
    target = np.array(matplotlib.colors.to_rgb(colour))
    return int((np.abs(pixels - target).max(axis=-1) < 0.08).sum())


def test_report_writes_a_png_per_metric_family_and_one_page_grouped_by_experiment(tmp_path, capsys):
    import base64

    pytest.importorskip("matplotlib")
    for n, lr in enumerate((0.1, 0.01)):
        rows = [
            observed_row(
                s, 3.0 / (s + n), lr=lr, samples_per_s=1e4 * (n + 1), tflops=n + 1.0, **{"memory/rss_mb": 300 * (n + 1)}
            )
            for s in (10, 20, 30)
        ]
        rows.append({"epoch": 1, "step": 30, "train/loss": 0.2 + n, "val/loss": 0.3 + n, "val/perplexity": 1.5})
        make_run(tmp_path, f"lm-{n}", ["experiment=charlm", f"optimizer.lr={lr}"], rows, max_steps=30)
    reg = make_run(tmp_path, "reg", ["model=mlp"], [step_row(5, 1.0), {"epoch": 1, "step": 8, "train/loss": 0.5}])
    OmegaConf.save(
        OmegaConf.create(
            {
                "trainer": {"total_epochs": 1},
                "dataset": {"_target_": "runner.data.Regression"},
                "model": {"_target_": "runner.models.MLP"},
            }
        ),
        reg / "config.yaml",
    )
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # Two experiments, two tables: the charlm runs are never ranked against the regression run.
    assert "\ncharlm:\n" in out and "\nRegression-MLP:\n" in out
    charlm_table = out.split("\ncharlm:\n")[1].split("\n\n")[0]
    assert "lm-0" in charlm_table and "lm-1" in charlm_table and "reg" not in charlm_table
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == [
        *(f"Regression-MLP-{f}.png" for f in ("loss", "lr", "throughput")),
        *(f"charlm-{f}.png" for f in ("loss", "lr", "memory", "throughput", "time", "val")),
    ]
    folder = tmp_path / "report"
    # Content: each run of a group is a line of its own colour; a group of one run draws only the first.
    for family in ("loss", "lr", "throughput", "memory"):
        assert colour_pixels(folder / f"charlm-{family}.png", "C0") > 100, family
        assert colour_pixels(folder / f"charlm-{family}.png", "C1") > 100, family
    assert colour_pixels(folder / "Regression-MLP-loss.png", "C0") > 20
    assert colour_pixels(folder / "Regression-MLP-loss.png", "C1") == 0
    # The time plot stacks the phases of each run: data (C0) then step (C1), step 5x as wide.
    data, step = colour_pixels(folder / "charlm-time.png", "C0"), colour_pixels(folder / "charlm-time.png", "C1")
    assert 3.5 < step / data < 6.5, (data, step)

    page = (tmp_path / "report.html").read_text()
    assert f"plots: 9 PNGs in {folder}; page: {tmp_path / 'report.html'}" in out
    assert page.count("<section>") == 2 and page.count("<table>") == 2 and "<td>lm-1</td>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 9 and not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched
    assert base64.b64decode(images[0]) == (folder / "Regression-MLP-loss.png").read_bytes()


def test_the_page_renders_in_a_headless_browser(tmp_path):
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    pytest.importorskip("matplotlib")
    make_run(tmp_path, "a", ["optimizer.lr=0.1"], [observed_row(s, 1.0 / s) for s in (10, 20)], max_steps=20)
    assert report.main([str(tmp_path)]) == 0
    shot = tmp_path / "page.png"
    res = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            "--dump-dom",
            (tmp_path / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "<td>a</td>" in res.stdout and res.stdout.count("<img") == 5
    # The screenshot shows the images drawn: the plots' line colour is on the page.
    assert colour_pixels(shot, "C0") > 200
