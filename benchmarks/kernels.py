"""Which weight format multiplies fastest here, by number of rows: one linear layer at a time.

    python benchmarks/kernels.py                          # 1 thread, the default shapes and rows
    python benchmarks/kernels.py --threads 2 --rows 1 8 16 64 --formats fp32 fp16w

A decode step multiplies a few rows (one per sequence in the batch) by every weight; a
prefill or an image encode multiplies tens to hundreds. The first is bound by reading the
weights, the second by arithmetic, so the best format differs between them. For each shape
(``INxOUT``) and row count this times ``F.linear`` in float32 and each other format's layer
from ``vlm.quantize`` on the same random weights, and prints the median time and float32's
time over it (above 1: faster than float32). Run it on an idle machine.

Formats: ``fp32``; ``fp32-packed`` (float32 weights in oneDNN's blocked layout, multiplied by
its inner product: the same arithmetic in another order); ``fp16w`` (fp16 weights, fp32 arithmetic: fbgemm, x86 only);
``fp16w-op`` (the same kernel through ``torch.ops``' public entry, ~30 µs a call slower); ``int8w``
(weight-only int8, bf16 arithmetic); ``int8dyn`` (PyTorch dynamic quantisation: int8
weights and per-tensor int8 activations); ``bf16`` (weights and activations; not timed
unless named: without a CPU's bf16 instructions it can be tens of times slower).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from vlm.quantize import (
    Fp16WeightLinear,
    Int8WeightLinear,
    PackedLinear,
    fp16_weights_supported,
    packed_fp32_supported,
)

# SmolLM2-135M's MLP and LM head, and ViT-B's MLP (also the perceiver's at width 768).
SHAPES = ["576x1536", "1536x576", "576x49152", "768x3072", "3072x768"]


def layer(fmt: str, linear: nn.Linear):
    """A callable taking float32 rows (N, IN) for ``fmt``."""
    if fmt == "fp32":
        return linear
    if fmt == "fp32-packed":
        return PackedLinear(linear)
    if fmt == "fp16w":
        return Fp16WeightLinear(linear)
    if fmt == "fp16w-op":  # the same layer called through torch.ops' public entry
        packed = Fp16WeightLinear(linear).packed
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    if fmt == "int8w":
        return Int8WeightLinear(linear)
    if fmt == "bf16":
        low = nn.Linear(linear.in_features, linear.out_features, bias=False).to(torch.bfloat16)
        low.weight.data.copy_(linear.weight)
        return lambda x: low(x.to(torch.bfloat16))
    if fmt == "int8dyn":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    raise ValueError(f"unknown format {fmt!r}")


def median_ms(fns: list, x: torch.Tensor, min_s: float) -> float:
    """Median time of one call, from passes over all of ``fns`` (distinct weights)."""
    for fn in fns:
        fn(x)
    times: list[float] = []
    while sum(times) < min_s or len(times) < 5:
        start = time.perf_counter()
        for fn in fns:
            fn(x)
        times.append((time.perf_counter() - start) / len(fns))
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="INxOUT (default: %(default)s)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    formats = ["fp32", "fp32-packed", "fp16w", "fp16w-op", "int8w", "int8dyn", "bf16"]
    parser.add_argument(
        "--formats", nargs="+", choices=formats, default=["fp32", "fp32-packed", "fp16w", "int8w", "int8dyn"]
    )
    parser.add_argument(
        "--working_set_mb", type=float, default=64, help="float32 weights cycled through (default: %(default)s)"
    )
    parser.add_argument("--min_s", type=float, default=0.3, help="time spent per measurement (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    supported = {"fp16w": fp16_weights_supported(), "fp16w-op": fp16_weights_supported()}
    supported["fp32-packed"] = packed_fp32_supported()
    fmts = [f for f in args.formats if supported.get(f, True)]
    if "fp32" not in fmts:
        fmts.insert(0, "fp32")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.working_set_mb:g} MB of float32 "
        "weights cycled; ms (float32's time / this format's)"
    )
    print(f"{'shape':>12} {'rows':>5} " + " ".join(f"{f:>16}" for f in fmts))
    torch.manual_seed(0)
    for shape in args.shapes:
        n_in, n_out = (int(v) for v in shape.split("x"))
        copies = max(1, round(args.working_set_mb * 2**20 / (4 * n_in * n_out)))
        linears = [nn.Linear(n_in, n_out, bias=False) for _ in range(copies)]
        layers = {f: [layer(f, linear) for linear in linears] for f in fmts}
        for rows in args.rows:
            x = torch.randn(rows, n_in)
            with torch.inference_mode():
                ms = {f: median_ms(layers[f], x, args.min_s) for f in fmts}
            cells = [f"{ms[f]:8.3f} ({ms['fp32'] / ms[f]:4.2f}x)" for f in fmts]
            print(f"{shape:>12} {rows:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
