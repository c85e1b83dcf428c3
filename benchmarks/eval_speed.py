"""Speed of one validation pass (`charrnn.evaluation.evaluate`, as after every epoch) on CPU:
the fast path (`charrnn.ops.evaluation()`) against the stock `nn.GRU` / `nn.LSTM` modules.

    python benchmarks/eval_speed.py [--arch gru --hidden 1024 --embed 256 --layers 1
                                     --chars 111540 --streams 64 --seq-len 256 --repeats 3]

Each pass runs in a process of its own (so that each reports its own peak memory), the two
paths alternating; random ids stand in for the text (Tiny Shakespeare's validation split is
111,540 characters).  Prints one JSON object: per path the median seconds, characters per
second and peak RSS, the loss (equal within float32 rounding), and the speed-up.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_model_options, emit, machine, peak_rss_mb  # noqa: E402


def child(args):
    import numpy as np
    import torch

    from charrnn import ops
    from charrnn.models import CharLM, ModelConfig
    from charrnn.evaluation import evaluate

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=65, arch=args.arch, hidden=args.hidden, embed=args.embed,
                               layers=args.layers, dropout=0.1))
    ids = np.random.default_rng(0).integers(0, 65, args.chars).astype(np.int32)
    with ops.use(fast_rnn=args.path == "fast"):
        evaluate(model, ids[: args.streams * 64], seq_len=args.seq_len, n_streams=args.streams)   # warm-up
        t = time.perf_counter()
        r = evaluate(model, ids, seq_len=args.seq_len, n_streams=args.streams)
    print(json.dumps({"s": time.perf_counter() - t, "loss": r["loss"], "peak_rss_mb": peak_rss_mb()}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--chars", type=int, default=111_540)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--path", choices=["fast", "stock"], help=argparse.SUPPRESS)   # one pass, in a child
    args = p.parse_args(argv)
    if args.path:
        return child(args)
    runs = {"fast": [], "stock": []}
    for _ in range(args.repeats):
        for path in runs:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--path", path]
            runs[path].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    out = {"benchmark": "eval_speed", "arch": args.arch, "hidden": args.hidden, "layers": args.layers,
           "chars": args.chars, "streams": args.streams, "seq_len": args.seq_len}
    median = {path: statistics.median(r["s"] for r in rs) for path, rs in runs.items()}
    for path, rs in runs.items():
        out[path] = {"s_median": round(median[path], 3), "chars_per_s": round(args.chars / median[path]),
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1), "loss": rs[0]["loss"]}
    out["speedup"] = round(median["stock"] / median["fast"], 2)
    emit({**out, **machine()})


if __name__ == "__main__":
    main()
