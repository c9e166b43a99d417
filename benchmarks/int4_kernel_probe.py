"""Probe (issue 11): matmul time of PyTorch's CPU kernels for bf16, int8 and int4 (group-32
asymmetric) weights at 1-16 rows, on 30 copies of a layer's matrices so the weights come
from memory, not cache, as in a decode step. It sets ``quark.quantize``'s ``INT8_MAX_ROWS``
and ``INT4_MAX_ROWS`` (the rows up to which a packed kernel beats bf16); see docs/results.md.

Usage: ``OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/int4_kernel_probe.py [--rows 1 4]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

GROUP = 32  # GGUF Q4_1's block size


def formats(out: int, inp: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One random [out, inp] weight as bf16, per-row int8 and group-wise int4 matmuls."""
    w = torch.randn(out, inp)
    groups = w.reshape(out, inp // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)  # [out, groups]
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(out, inp), 1)
    # The kernel's convention: w = (q - 8) * scale + zero, per group: [groups, out, 2].
    scales_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).bfloat16()
    row_scale = w.abs().amax(1) / 127
    w8 = (w / row_scale[:, None]).round().to(torch.int8)
    bf16 = w.bfloat16()
    return {
        "bf16": lambda x: torch.nn.functional.linear(x, bf16),
        "int8": lambda x: torch._weight_int8pack_mm(x, w8, row_scale.bfloat16()),
        "int4": lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros),
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
            times = {
                name: milliseconds([m[name] for m in mats], x) for name in ("bf16", "int8", "int4")
            }
            cells = ", ".join(f"{name} {ms:.2f}" for name, ms in times.items())
            print(f"{copies} x [{out} x {inp}], {rows} rows, ms: {cells}", flush=True)


if __name__ == "__main__":
    main()
