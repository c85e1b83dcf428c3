"""What this machine can do at best: the ceilings behind the generation figures.

    python benchmarks/kernel_speed.py [--repeats 7]

Times, for the default model's recurrent matrix (3072 x 1024), the matrix products one
generated character needs: fp32 (torch.addmm, MKL) and int8 (charrnn.native's kernels) at
batch 1 and 64; the per-step recurrent product of training at 32 and 64 rows through each of
charrnn.ops.matmul's three products (MKL addmm, oneDNN's packed matmul, charrnn.native's panels); the fp32
GEMM of a training step (6400 x 1024 x 3072) for the machine's fp32 rate; and read bandwidth from a cache-sized (3 MB, 12 MB) and a memory-sized (256 MB)
array.  Prints one JSON object; ``ceiling_chars_per_s`` is the rate if a step cost nothing
but that one product (the output layer, the gates and sampling come on top).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402

from charrnn import native  # noqa: E402
from charrnn import ops  # noqa: E402
from charrnn.ops.matmul import Product  # noqa: E402
from charrnn.stepper import _Linear  # noqa: E402


def median_s(fn, repeats, inner):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, G = 1024, 3072
    w, b = torch.randn(G, H) / H ** 0.5, torch.randn(G)
    out = {"benchmark": "kernels", "matrix": [G, H]}

    for batch in (1, 64):
        x = torch.randn(batch, H).tanh()
        t = median_s(lambda: torch.addmm(b, x, w.t()), args.repeats, 200 if batch == 1 else 20)
        out[f"fp32_b{batch}"] = {"us": round(t * 1e6, 1), "gflop_per_s": round(2 * batch * G * H / t / 1e9, 1),
                                 "ceiling_chars_per_s": round(batch / t)}
    module = native.load()
    out["native"] = module is not None
    if module is not None:
        parts = _Linear(w, b, int8=True).native_parts()
        for batch in (1, 64):
            x = torch.randn(batch, H).tanh()
            t = median_s(lambda: module.int8_linear(x, parts, G), args.repeats, 200 if batch == 1 else 20)
            out[f"int8_b{batch}"] = {"us": round(t * 1e6, 1), "gop_per_s": round(2 * batch * G * H / t / 1e9, 1),
                                     "weight_gb_per_s": round(G * H / t / 1e9, 1),
                                     "ceiling_chars_per_s": round(batch / t)}
    for rows in (32, 64):
        x, o = torch.randn(rows, H).tanh(), torch.empty(rows, G)
        rates = {}
        for kind, packed, panels in (("addmm", False, False), ("onednn", True, False), ("panels", True, True)):
            # onednn_first: else AVX-512 CPUs never get the panels
            with ops.use(packed=packed, native=panels, onednn_first=not panels):
                product = Product(w, rows)
            if product.kind == kind:
                t = median_s(lambda: product(x, b, out=o), args.repeats, 50)
                rates[kind] = round(2 * rows * G * H / t / 1e9, 1)
        out[f"recurrent_product_b{rows}_gflop_per_s"] = rates
    xb, ob = torch.randn(6400, H), torch.empty(6400, G)
    t = median_s(lambda: torch.mm(xb, w.t(), out=ob), max(3, args.repeats // 2), 2)
    out["fp32_training_gemm_gflop_per_s"] = round(2 * 6400 * G * H / t / 1e9, 1)
    for mb in (3, 12, 256):
        a = torch.ones(mb * 2**20 // 4)
        t = median_s(lambda: a.sum(), args.repeats, max(2, 600 // mb))
        out[f"read_{mb}mb_gb_per_s"] = round(a.numel() * 4 / t / 1e9, 1)
    try:
        out["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    emit({**out, **machine()})


if __name__ == "__main__":
    main()
