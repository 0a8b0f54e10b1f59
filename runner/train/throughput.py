"""Achieved TFLOP/s and MFU at each training row.

The FLOPs of a step are counted once, by `torch.utils.flop_counter.FlopCounterMode` around the
first step this process runs (forward and backward: the matrix products and attention that dominate
a step), or given per sample as `trainer.flops_per_sample`. The peak a device could do comes from
a small table by device name and precision, or `trainer.peak_tflops`; a device the table does not
know (a CPU) reports TFLOP/s without MFU. Counting costs one slower step and no host sync after it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU (vendor data sheets, no sparsity): (name fragment, bf16/fp16, tf32, fp32).
# The first fragment found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAKS: tuple[tuple[str, float, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0, 51.0),
    ("H100", 989.0, 494.0, 67.0),
    ("H200", 989.0, 494.0, 67.0),
    ("H800", 989.0, 494.0, 67.0),
    ("GH200", 989.0, 494.0, 67.0),
    ("B200", 2250.0, 1100.0, 80.0),
    ("A100", 312.0, 156.0, 19.5),
    ("A800", 312.0, 156.0, 19.5),
    ("L40S", 362.0, 183.0, 91.6),
    ("L40", 181.0, 90.5, 90.5),
    ("L4", 121.0, 60.0, 30.3),
    ("A10G", 70.0, 35.0, 31.2),
    ("A10", 125.0, 62.5, 31.2),
    ("V100", 125.0, 15.7, 15.7),
    ("T4", 65.0, 8.1, 8.1),
)


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The table's dense peak for this device at this precision (32 means tf32 where matmuls may
    use it), or None for a device it does not know (every CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, half, tf32, fp32 in PEAKS:
        if fragment in name:
            if str(precision) in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def _register_cpu_attention() -> None:
    """torch counts the GPU kernels of scaled_dot_product_attention but not the CPU one: the same formula."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    pairs = (
        ("_scaled_dot_product_flash_attention_for_cpu", forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", backward),
    )
    for name, formula in pairs:
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry and op.default not in fc.flop_registry:
            fc.register_flop_formula(op)(formula)


def count_flops(step: Callable[[], Any]) -> tuple[Any, Optional[float]]:
    """(step's result, the FLOPs it ran) with FlopCounterMode around it. The mode only watches the
    operators (the numbers are the same bits); an error of the step itself is the step's and is raised."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        out = step()
    flops = float(counter.get_total_flops())
    return out, flops if flops > 0 else None


class Throughput:
    """FLOPs per sample (counted on the first step, or given) and the peak; turns a row's samples and
    seconds into TFLOP/s per worker and MFU, and keeps every row's figures for the summary."""

    def __init__(self, device: torch.device, precision: str, flops_per_sample=None, peak_tflops=None) -> None:
        self.flops_per_sample = float(flops_per_sample) if flops_per_sample else None
        self.peak = float(peak_tflops) if peak_tflops else device_peak_tflops(device, precision)
        self.counting = self.flops_per_sample is None
        self.rows: list[tuple[float, float, Optional[float]]] = []  # (seconds, TFLOP/s, MFU) of each row

    def step(self, run: Callable[[], Any], samples: int) -> Any:
        """Run one step; the first one is counted (`samples`: this rank's samples in it)."""
        if not self.counting:
            return run()
        self.counting = False
        out, flops = count_flops(run)
        if flops and samples:
            self.flops_per_sample = flops / samples
        return out

    def row(self, samples_per_s_per_worker: Optional[float], seconds: float) -> dict[str, float]:
        """`tflops` (achieved per worker) and `mfu` (a fraction of the peak) for a row."""
        if self.flops_per_sample is None or not samples_per_s_per_worker:
            return {}
        tflops = self.flops_per_sample * samples_per_s_per_worker / 1e12
        fields = {"tflops": tflops}
        mfu = tflops / self.peak if self.peak else None
        if mfu is not None:
            fields["mfu"] = mfu
        self.rows.append((seconds, tflops, mfu))
        return fields

    def summary(self) -> dict[str, Any]:
        """The run's mean (weighted by each row's time) and best row, of TFLOP/s and MFU."""
        if not self.rows:
            return (
                {"flops_per_sample": self.flops_per_sample, "peak_tflops": self.peak} if self.flops_per_sample else {}
            )
        seconds = sum(r[0] for r in self.rows)
        mean = sum(r[0] * r[1] for r in self.rows) / seconds if seconds else None
        out: dict[str, Any] = {
            "flops_per_sample": self.flops_per_sample,
            "tflops_mean": mean,
            "tflops_best": max(r[1] for r in self.rows),
            "peak_tflops": self.peak,
        }
        if self.peak and mean is not None:
            out["mfu_mean"] = mean / self.peak
            out["mfu_best"] = out["tflops_best"] / self.peak
        return out
