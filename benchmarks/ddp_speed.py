"""Data-parallel training throughput: `charrnn train` in 1 process against N processes under torchrun.

    python benchmarks/ddp_speed.py [--configs 1x2,2x1] [--repeats 3] [--steps 20] [--log-every 4]
                                   [--corpus shakespeare] [any `charrnn train` option]

A config ``PxT`` is P processes (torchrun when P > 1) of T CPU threads each (``OMP_NUM_THREADS``);
the default compares one process using every core with one single-threaded process per core.
Runs the real command line (the default model unless options say otherwise; the global batch
``--batch-size`` is the same for every config), alternating the configs' order in each repeat
so that a busy machine hurts them alike.  Throughput is the ``chars_per_s`` the trainer logs
(characters of the whole job per second over each ``--log-every`` window; the first two windows
are dropped as warm-up), median per run, then median over the repeats.  Prints
{"configs": {"1x2": {"chars_per_s", "runs"}, ...}, "speedup", ...}.
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


def run(procs: int, threads: int, corpus: str, out: str, steps: int, log_every: int, rest: list[str]) -> dict:
    launcher = [sys.executable, "-m", "charrnn"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                    "-m", "charrnn"]
    cmd = [*launcher, "train", corpus, "--out", out, "--max-steps", str(steps), "--log-every", str(log_every),
           "--sample-every", "0", "--val-fraction", "0.01", "--quiet", *rest]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [m["chars_per_s"] for m in map(json.loads, f) if "chars_per_s" in m]
    return {"chars_per_s": round(statistics.median(windows[2:] or windows), 1), "wall_s": round(wall, 1),
            "load_before": round(load, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument("--configs", default=f"1x{cores},{cores}x1", help="PxT,... (default 1xCORES,CORESx1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--corpus", default="shakespeare")
    args, rest = p.parse_known_args(argv)
    configs = [c.strip() for c in args.configs.split(",")]
    runs: dict[str, list] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="charrnn-ddp-") as tmp:
        for i in range(args.repeats):
            for c in (configs if i % 2 == 0 else configs[::-1]):
                procs, threads = (int(v) for v in c.split("x"))
                runs[c].append(run(procs, threads, args.corpus, os.path.join(tmp, f"r{i}-{c}"), args.steps,
                                   args.log_every, rest))
    result = {c: {"chars_per_s": statistics.median(r["chars_per_s"] for r in rs), "runs": rs}
              for c, rs in runs.items()}
    base = result[configs[0]]["chars_per_s"]
    emit({"benchmark": "ddp_speed", "options": rest, "steps": args.steps, "configs": result,
          "speedup": {c: round(v["chars_per_s"] / base, 3) for c, v in result.items()}, **machine()})


if __name__ == "__main__":
    main()
