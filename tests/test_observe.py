"""What a run says about itself, in this process: FLOPs counted against a hand count, TFLOP/s and
MFU in the training rows, the step-time breakdown, memory, and the summary's lines about them."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
import torch
from check_helpers import refusal
from conftest import FAST, metrics, run_cli
from loop_helpers import config, train

from runner.driver.observed import observed_lines
from runner.examples.charlm import TinyGPT
from runner.models import MLP
from runner.tasks import LanguageModel
from runner.train import faults
from runner.train.memory import describe_oom, memory_mb
from runner.train.throughput import Throughput, count_flops, device_peak_tflops
from runner.train.timing import PhaseClock


def step_flops(model: torch.nn.Module, loss_of) -> float:
    def step():
        loss = loss_of(model)
        loss.backward()
        return loss

    return count_flops(step)[1]


def test_flops_of_an_mlp_match_a_hand_count():
    batch, sizes = 32, [20, 64, 64, 3]  # in, two hidden layers, out
    model = MLP(20, 3, hidden_size=64, depth=2)
    x = torch.randn(batch, 20)
    counted = step_flops(model, lambda m: m(x).square().mean())
    layers = list(zip(sizes, sizes[1:]))
    forward = sum(2 * batch * i * o for i, o in layers)
    weight_grads = forward  # one product per layer for the weight's gradient...
    input_grads = sum(2 * batch * i * o for i, o in layers[1:])  # ...and one for the input's, but not the data's
    assert counted == pytest.approx(forward + weight_grads + input_grads, rel=0.05)


def test_flops_of_the_character_gpt_match_a_hand_count():
    layers, width, vocab, length, batch = 2, 128, 128, 64, 4  # model=tiny_gpt as experiment=charlm builds it
    model = TinyGPT(vocab_size=vocab, block_size=length, n_layer=layers, n_head=4, n_embd=width)
    tokens = torch.randint(0, vocab, (batch, length + 1))
    counted = step_flops(model, lambda m: LanguageModel().training_step(m, tokens))
    # 6 N per token for the matrix products (N: 12 d^2 per block and the tied head) and 12 L T d for
    # attention's two products (forward and backward, causal masking not subtracted, as FlopCounterMode).
    params = layers * 12 * width * width + width * vocab
    hand = (6 * params + 12 * layers * length * width) * batch * length
    assert counted == pytest.approx(hand, rel=0.05)


def test_peak_table_and_mfu():
    assert device_peak_tflops(torch.device("cpu"), "bf16") is None  # a CPU: TFLOP/s without MFU
    counted = Throughput(torch.device("cpu"), "32")
    out = counted.step(lambda: torch.ones(8, 8) @ torch.ones(8, 8), samples=2)
    assert out.sum() == 512 and counted.flops_per_sample == 2 * 8**3 / 2
    assert counted.row(1e9, 1.0) == {"tflops": pytest.approx(0.512)}  # 512 FLOPs a sample, 1e9 samples/s
    given = Throughput(torch.device("cpu"), "32", flops_per_sample=1e6, peak_tflops=2.0)
    given.step(lambda: None, samples=1)
    assert given.flops_per_sample == 1e6  # given: never counted
    assert given.row(1e6, 1.0) == {"tflops": 1.0, "mfu": 0.5}
    assert given.row(2e6, 3.0) == {"tflops": 2.0, "mfu": 1.0}
    summary = given.summary()
    assert summary["tflops_mean"] == pytest.approx(1.75) and summary["tflops_best"] == 2.0  # weighted by time
    assert summary["mfu_mean"] == pytest.approx(0.875) and summary["mfu_best"] == 1.0


def test_phase_clock_charges_every_second_to_one_phase():
    clock = PhaseClock(torch.device("cpu"))
    started = time.perf_counter()
    time.sleep(0.02)
    clock.lap("data")
    with clock.phase("eval"):
        time.sleep(0.03)
    time.sleep(0.01)
    clock.lap("step")
    row = clock.flush()
    wall = time.perf_counter() - started
    assert row["data"] == pytest.approx(0.02, abs=0.01) and row["eval"] == pytest.approx(0.03, abs=0.01)
    assert row["step"] == pytest.approx(0.01, abs=0.01)
    assert sum(row.values()) == pytest.approx(wall, abs=0.005)
    assert clock.flush() == {} and clock.totals["eval"] == row["eval"]


def test_training_rows_carry_throughput_time_breakdown_and_memory(tmp_path):
    run = train(tmp_path, config("trainer.log_every=3", "trainer.peak_tflops=1e-6", "trainer.save_every_steps=4"))
    assert run.error is None, run.error
    rows = metrics(tmp_path, steps=True)
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 15, 18]  # 2 epochs of 10 steps
    # Linear(3, 16), Tanh, Linear(16, 1): forward 2 (48 + 16), backward 2 x 16 + 2 (48 + 16) (no grad of the data).
    assert run.summary["flops_per_sample"] == 2 * 64 + 2 * 16 + 2 * 64
    for row in rows:
        per_worker = row["samples_per_s"]  # one worker
        assert row["tflops"] == pytest.approx(288 * per_worker / 1e12, rel=0.02)
        assert row["mfu"] == pytest.approx(row["tflops"] / 1e-6)
        phases = {k: v for k, v in row.items() if k.startswith("time/")}
        assert {"time/data", "time/step", "time/optimizer", "time/log"} <= phases.keys()
        assert all(v >= 0 for v in phases.values()) and phases["time/step"] > 0
        # The phases cover the row's wall time: 3 steps of 4 samples (2 in an epoch's last step).
        assert sum(phases.values()) == pytest.approx(11 / row["samples_per_s"], rel=0.3)
        assert row["memory/rss_mb"] > 10 and "memory/cuda_max_allocated_mb" not in row
    assert "time/snapshot" in rows[1]  # the snapshot of step 4 is in the second row
    s = run.summary
    assert s["tflops_best"] >= s["tflops_mean"] > 0 and s["mfu_best"] == pytest.approx(s["tflops_best"] / 1e-6)
    breakdown = s["time_breakdown"]
    assert {"data", "step", "optimizer", "snapshot", "epoch_end"} <= breakdown.keys()
    assert sum(breakdown.values()) <= s["train_seconds"]
    assert s["memory_peak"]["memory/rss_mb"] >= rows[0]["memory/rss_mb"]
    lines = observed_lines(s)
    assert lines[0].startswith("compute       : ") and "TFLOP/s per worker (best row " in lines[0]
    assert "MFU " in lines[0] and "of 1e-06 TFLOP/s" in lines[0]
    assert lines[1].startswith("time          : ") and "(of " in lines[1] and "s, rank 0)" in lines[1]
    shares = [int(p.rsplit(" ", 1)[1][:-1]) for p in lines[1][16:].split(" (of ")[0].split(", ")]
    assert shares == sorted(shares, reverse=True) and 97 <= sum(shares) <= 103  # largest first, all of it

    on_cpu = train(tmp_path / "cpu", config("trainer.log_every=5", "trainer.flops_per_sample=1000"))
    assert on_cpu.summary["flops_per_sample"] == 1000 and "mfu_mean" not in on_cpu.summary
    assert all("mfu" not in r for r in metrics(tmp_path / "cpu", steps=True))
    assert "MFU n/a (no peak known for this device: trainer.peak_tflops)" in observed_lines(on_cpu.summary)[0]


def test_profiler_window_writes_a_trace_with_events_and_the_top_operators(tmp_path):
    run = train(tmp_path, config("trainer.profile.start_step=4", "trainer.profile.steps=3", "trainer.log_every=0"))
    assert run.error is None, run.error
    trace = tmp_path / "profile" / "rank-0.json.gz"
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    assert any(e["name"] == "aten::addmm" for e in ops) and any("Optimizer.step" in e["name"] for e in events)
    # The window is 3 steps: 3 optimizer steps recorded, and nothing of the steps around it.
    assert sum(1 for e in events if e["name"].startswith("Optimizer.step#SGD.step")) == 3
    assert "Self CPU" in (tmp_path / "profile" / "rank-0.txt").read_text()
    s = run.summary
    assert s["profile_traces"] == ["profile/rank-0.json.gz"] and len(s["profile_top"]) == 5
    assert all(isinstance(name, str) and ms >= 0 for name, ms in s["profile_top"])
    lines = observed_lines(s, "outputs/run")
    assert "profile       : outputs/run/profile/rank-0.json.gz" in lines
    assert next(x for x in lines if x.startswith("top operators : ")).count(" ms") == 5

    # A window that the run ends inside is written at the end; a rank not asked records nothing.
    short = train(tmp_path / "short", config("trainer.profile.start_step=19", "trainer.profile.steps=5"))
    assert short.error is None and (tmp_path / "short" / "profile" / "rank-0.json.gz").is_file()
    other = train(tmp_path / "other", config("trainer.profile.start_step=2", "trainer.profile.ranks=[1]"))
    assert other.error is None and not (tmp_path / "other" / "profile").exists()
    assert other.summary["profile_traces"] == ["profile/rank-1.json.gz"] and other.summary["profile_top"] == []


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.flops_per_sample=0", "trainer.flops_per_sample"),
        ("trainer.peak_tflops=-1", "trainer.peak_tflops"),
        ("trainer.profile.start_step=0", "trainer.profile.start_step"),
        ("trainer.profile.steps=0", "trainer.profile.steps"),
        ("trainer.profile.ranks=[-1]", "trainer.profile.ranks"),
        ("launch.hang_timeout=-1", "launch.hang_timeout"),
    ],
)
def test_bad_observability_keys_are_refused_before_launch(tmp_path, override, key):
    err = refusal([override], tmp_path)
    assert err.key == key and key in err.render() and "e.g." in err.render()


def test_summary_lines_without_training_rows_use_the_runs_mean():
    summary = {"flops_per_sample": 1e9, "samples_per_s": 4000.0, "world_size": 2, "peak_tflops": 4.0}
    assert observed_lines(summary) == ["compute       : 2 TFLOP/s per worker, MFU 50.0% of 4 TFLOP/s"]
    gpu = {"memory_peak": {"memory/cuda_max_allocated_mb": 2048.0, "memory/cuda_max_reserved_mb": 3000.0}}
    assert observed_lines(gpu) == [
        "gpu memory    : 2,048 MB allocated at most, 3,000 MB reserved (the most of any rank)"
    ]
    assert observed_lines({}) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_phases_are_device_time_and_rows_carry_cuda_memory():
    device = torch.device("cuda")
    clock = PhaseClock(device)
    a = torch.randn(4096, 4096, device=device)
    clock.restart()
    for _ in range(20):
        a = a @ a / 4096  # queued: the host returns at once
    clock.lap("step")
    time.sleep(0.2)  # the host waits, the device is idle: the next phase's device time is short
    clock.lap("data")
    torch.cuda.synchronize()
    row = clock.flush()
    assert row["step"] > 0.001 and row["data"] >= 0.0 and sum(row.values()) == pytest.approx(row["step"] + row["data"])
    mem = memory_mb(device)
    assert mem["memory/cuda_max_allocated_mb"] >= 64 and mem["memory/cuda_max_reserved_mb"] >= 64
    name = torch.cuda.get_device_name(device)
    peak = device_peak_tflops(device, "bf16")
    assert peak is None or peak > 50, name  # a known GPU has its dense bf16 peak in the table


def test_an_out_of_memory_error_that_repeats_at_its_step_is_one_failure(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.FAILURE_RECORDS, str(tmp_path))
    monkeypatch.setattr(faults, "current_step", 30)
    for attempt, free in ((0, 100), (1, 250)):  # torch's message names sizes that differ between attempts
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        faults.record_failure(torch.OutOfMemoryError(f"CUDA out of memory. {free}.00 MiB is free."), rank=1)
    repeated = faults.repeated_failure(tmp_path, 1)
    assert repeated == {"type": "torch.OutOfMemoryError", "message": "CUDA out of memory", "step": 30}
    monkeypatch.setattr(faults, "current_step", 31)  # at another step: another failure, restarted
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    faults.record_failure(torch.OutOfMemoryError("CUDA out of memory."), rank=1)
    assert faults.repeated_failure(tmp_path, 2) is None
    assert describe_oom(tmp_path, 1, 30).startswith("out of memory on rank 1 after step 30: host RSS ")


@pytest.mark.slow
def test_a_repeated_out_of_memory_error_is_reported_with_rank_and_step_and_not_retried(workdir):
    plugins = os.pathsep.join(filter(None, [str(Path(__file__).parent / "plugins"), os.environ.get("PYTHONPATH")]))
    args = [
        "name=oom",
        "model._target_=faulty.FaultyLinear",
        "+model.fail_after_step=30",
        "+model.oom_rank=1",
        "trainer.total_epochs=3",
        "trainer.save_every_steps=20",
        *FAST,
    ]
    res = run_cli(args, workdir, env={"PYTHONPATH": plugins})
    assert res.returncode == 1, res.output
    assert (
        "(not restarting: the same error after restart 1): OutOfMemoryError: CUDA out of memory. Tried to allocate"
        in res.stderr
    )
    assert "out of memory on rank 1 after step 30: host RSS" in res.stderr, res.stderr
    log = (workdir / "outputs" / "oom" / "train.log").read_text()
    assert "(restart 1 after a worker failure)" in log and "restart 2" not in log
