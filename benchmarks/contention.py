"""Speed beside other processes: each workload alone, beside a busy-looping process, beside a second charrnn
process doing the same work, and (steps only) among three such processes.

    python benchmarks/contention.py [--corpus PATH] [--seconds 10]
                                    [--workloads train64 train sample1 sample64 serve16] [--weights fp32 int8]

Workloads (each measured in a process of its own, as a user runs it):
- ``train64``: ``charrnn.train`` of a 64-unit GRU (embedding 16, batch 64 x 100, fp32); ``train``: the default
  model (GRU 1024, embedding 256), fp32.  chars/s from the median step (the steps' times from an
  ``after_step`` hook; the first three left out).
- ``sample1``, ``sample64``: the default model's sampler (random weights) at batch 1 / 64, ``--weights``; one
  long generation, timed every 100 steps; chars/s from the median 100 steps.
- ``serve16``: `charrnn serve` (the default model, random weights) and 16 clients streaming 300 characters each
  from ``/v1/completions`` (serve_load.py's), round after round for ``--seconds``; chars/s of the median round.

Prints one JSON object: per workload and weights, ``alone``, ``busy`` and ``twin`` chars/s (``twin``: the
slower of the two), their shares of ``alone``; for step workloads ``three`` (the slowest of three equal
processes) and ``three_worst_step`` (the slowest step over the median step, the worst of the three); for
``train64`` also ``alone_one_thread`` (``OMP_NUM_THREADS=1``) and ``busy`` as a share of it.  Run it on an otherwise quiet machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import emit, machine  # noqa: E402

STEP_WORKLOADS = ("train64", "train", "sample1", "sample64")
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


# ----- one measured process ---------------------------------------------------------------------------------

def _train(corpus: str, seconds: float, hidden: int, embed: int) -> dict:
    import charrnn

    times = []
    with tempfile.TemporaryDirectory() as out:
        charrnn.train(corpus, os.path.join(out, "run"), hidden=hidden, embed=embed, precision="fp32", batch_size=64,
                      seq_len=100, time_limit=seconds, sample_every=0, progress=False, log=lambda msg: None,
                      hooks={"after_step": lambda trainer, info: times.append(time.perf_counter())})
    skip = min(3, max(0, len(times) - 3))        # a process that made few steps keeps them all but the first
    steps = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    if not steps:
        raise SystemExit(f"fewer than two steps in {seconds} s: give more --seconds")
    return {"chars_per_s": 64 * 100 / statistics.median(steps), "steps": steps}


def _sample(seconds: float, batch: int, weights: str) -> dict:
    import torch

    from charrnn.models import CharLM, ModelConfig
    from charrnn.sampling import Sampler
    from charrnn.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab(sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")))
    sampler = Sampler(CharLM(ModelConfig(len(vocab))), vocab, weights=weights)
    chunk, times = 100, [time.perf_counter()]
    end = times[0] + seconds
    for n, ids in enumerate(sampler.stream_ids(["ROMEO:"] * batch, 10**7, temperature=1.0, seed=0), 1):
        if n % chunk == 0:
            ids.tolist()
            times.append(time.perf_counter())
            if times[-1] > end:
                break
    steps = [b - a for a, b in zip(times[1:], times[2:])]       # the first chunk holds the prompt
    return {"chars_per_s": batch * chunk / statistics.median(steps), "steps": steps}


def _serve(seconds: float, weights: str) -> dict:
    """16 clients streaming 300 characters each from `charrnn serve`, again and again for ``seconds``: chars/s
    of each round (so that twins overlap for most of their time)."""
    import asyncio

    from serve_load import random_run, served, stream_load

    rates = []
    with tempfile.TemporaryDirectory() as tmp, served(random_run(tmp), 16, weights == "int8") as (_, url):
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            rates.append(asyncio.run(stream_load(url, 16, 300))["chars_per_s"])
    return {"chars_per_s": statistics.median(rates), "steps": []}


def worker(args) -> None:
    if args.worker == "train64":
        result = _train(args.corpus, args.seconds, 64, 16)
    elif args.worker == "train":
        result = _train(args.corpus, args.seconds, 1024, 256)
    elif args.worker in ("sample1", "sample64"):
        result = _sample(args.seconds, int(args.worker[6:]), args.weights[0])
    else:
        result = _serve(args.seconds, args.weights[0])
    print(json.dumps(result))


# ----- the scenarios ----------------------------------------------------------------------------------------

def _start(workload: str, weights: str, args, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", workload, "--weights", weights, "--seconds",
           str(args.seconds), "--corpus", args.corpus]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        out.append(json.loads(stdout))
    return out


def measure(workload: str, weights: str, args) -> dict:
    alone = _results([_start(workload, weights, args)])[0]
    busy_loop = subprocess.Popen(BUSY_LOOP)
    try:
        time.sleep(0.5)
        busy = _results([_start(workload, weights, args)])[0]
    finally:
        busy_loop.kill()
        busy_loop.wait()
    twins = _results([_start(workload, weights, args) for _ in range(2)])
    row = {"workload": workload, "weights": weights if workload != "train64" and workload != "train" else "fp32",
           "alone": round(alone["chars_per_s"]), "busy": round(busy["chars_per_s"]),
           "twin": round(min(t["chars_per_s"] for t in twins))}
    row["busy_share"] = round(row["busy"] / row["alone"], 3)
    row["twin_share"] = round(row["twin"] / row["alone"], 3)
    if workload == "train64":      # its one-thread speed, the bar beside a busy loop
        one = _results([_start(workload, weights, args, {"OMP_NUM_THREADS": "1"})])[0]
        row["alone_one_thread"] = round(one["chars_per_s"])
        row["busy_of_one_thread"] = round(row["busy"] / row["alone_one_thread"], 3)
    if workload in STEP_WORKLOADS:
        three = _results([_start(workload, weights, args) for _ in range(3)])
        row["three_worst_step"] = round(max(max(t["steps"]) / statistics.median(t["steps"]) for t in three), 2)
        row["three"] = round(min(t["chars_per_s"] for t in three))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="shakespeare", help="the training workloads' corpus (default shakespeare)")
    p.add_argument("--seconds", type=float, default=10.0, help="each measured process's work (default 10)")
    p.add_argument("--workloads", nargs="+", default=["train64", "train", "sample1", "sample64", "serve16"],
                   choices=["train64", "train", "sample1", "sample64", "serve16"])
    p.add_argument("--weights", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"],
                   help="the sampling and serving workloads' weights")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    for workload in args.workloads:
        for weights in (["fp32"] if workload.startswith("train") else args.weights):
            rows.append(measure(workload, weights, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    emit({"benchmark": "contention", "seconds": args.seconds, "results": rows, **machine()})


if __name__ == "__main__":
    main()
