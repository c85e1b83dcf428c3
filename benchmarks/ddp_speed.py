"""Data-parallel training throughput: `charrnn train` in 1 process against N processes under torchrun.

    python benchmarks/ddp_speed.py [--procs 1,2] [--repeats 3] [--steps 30] [--log-every 5]
                                   [--corpus shakespeare] [any `charrnn train` option]

Runs the real command line (the default model unless options say otherwise; global batch
`--batch-size`, the same for every process count), alternating the process counts in each
repeat so that a busy machine hurts them alike.  Throughput is the `chars_per_s` the trainer
logs (global characters of the whole job per second over each `--log-every` window; the first
two windows are dropped as warm-up), median per run, then median over the repeats.  Prints
{"procs": {"1": {"chars_per_s", "runs"}, "2": {...}}, "speedup", ...}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402


def run(procs: int, corpus: str, out: str, steps: int, log_every: int, rest: list[str]) -> dict:
    launcher = [sys.executable, "-m", "charrnn"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                    "-m", "charrnn"]
    cmd = [*launcher, "train", corpus, "--out", out, "--max-steps", str(steps), "--log-every", str(log_every),
           "--sample-every", "0", "--val-fraction", "0.01", "--quiet", *rest]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [m["chars_per_s"] for m in map(json.loads, f) if "chars_per_s" in m]
    return {"chars_per_s": round(statistics.median(windows[2:] or windows), 1), "wall_s": round(wall, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2", help="process counts to compare (default 1,2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--corpus", default="shakespeare")
    args, rest = p.parse_known_args(argv)
    counts = [int(x) for x in args.procs.split(",")]
    runs: dict[int, list] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="charrnn-ddp-") as tmp:
        for i in range(args.repeats):
            for n in (counts if i % 2 == 0 else counts[::-1]):
                runs[n].append(run(n, args.corpus, os.path.join(tmp, f"r{i}-{n}"), args.steps, args.log_every, rest))
    result = {n: {"chars_per_s": statistics.median(r["chars_per_s"] for r in rs), "runs": rs}
              for n, rs in runs.items()}
    base = result[counts[0]]["chars_per_s"]
    emit({"benchmark": "ddp_speed", "options": rest, "steps": args.steps,
          "procs": {str(n): v for n, v in result.items()},
          "speedup": {str(n): round(v["chars_per_s"] / base, 3) for n, v in result.items()},
          "load_average": os.getloadavg(), **machine()})


if __name__ == "__main__":
    main()
