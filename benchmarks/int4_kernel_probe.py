"""Probe (issue 11): matmul time of PyTorch's CPU kernels for bf16, int8 and int4 (group-32
asymmetric) weights at 1-16 rows, on 30 copies of a layer's matrices so the weights come
from memory, not cache, as in a decode step; also float32's matmul and the packed kernels
fed float32 rows. It sets ``quark.quantize``'s ``INT8_MAX_ROWS`` and ``INT4_MAX_ROWS`` (the
rows up to which a packed kernel beats bf16); see docs/results.md.

Usage: ``OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/int4_kernel_probe.py [--rows 1 4]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quark.quantize import INT4_GROUP, Int4Linear, Int8Linear  # noqa: E402


def formats(out: int, inp: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One random [out, inp] weight as the bf16 matmul and the packed int8 and int4 matmuls
    the serving layers run (bf16 rows), then float32's matmul and the packed kernels fed
    float32 rows (what a float32 model would send them without a cast)."""
    linear = torch.nn.Linear(inp, out, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_()
    int8, int4 = Int8Linear(linear), Int4Linear(linear)
    weight, scale, zeros = (t.float() for t in (linear.weight, int8.scale, int4.scales_zeros))
    return {
        "bf16": lambda x: torch.nn.functional.linear(x, linear.weight),
        "int8": int8.packed_mm,
        "int4": int4.packed_mm,
        "fp32": lambda x: torch.nn.functional.linear(x.float(), weight),
        "int8 (fp32 rows)": lambda x: torch._weight_int8pack_mm(x.float(), int8.weight_int8, scale),
        "int4 (fp32 rows)": lambda x: torch._weight_int4pack_mm_for_cpu(
            x.float(), int4.weight_int4, INT4_GROUP, zeros
        ),
    }


def milliseconds(calls: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    for call in calls:  # warm-up
        call(x)
    start = time.perf_counter()
    for _ in range(20):
        for call in calls:
            call(x)
    return (time.perf_counter() - start) / 20 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for out, inp, copies in [(1536, 576, 30), (576, 1536, 30), (49152, 576, 1)]:
        mats = [formats(out, inp) for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, inp).bfloat16()
            times = {name: milliseconds([m[name] for m in mats], x) for name in mats[0]}
            cells = ", ".join(f"{name} {ms:.2f}" for name, ms in times.items())
            print(f"{copies} x [{out} x {inp}], {rows} rows, ms: {cells}", flush=True)


if __name__ == "__main__":
    main()
