"""Where the server's CPU time goes under streamed clients: a per-component table of `charrnn serve`.

    pip install py-spy
    python benchmarks/serve_profile.py [--clients 64] [--length 300] [--seconds 15] [--int8]

Starts `charrnn serve` on the default model (random weights) in a process of its own, keeps
``clients`` streamed ``/v1/completions`` requests running from this process for ``seconds`` seconds, and
meanwhile samples the server's Python threads with py-spy (active samples only, 200 a second) and
reads each of its threads' CPU time from ``/proc``.  Prints one JSON object:

- ``threads``: CPU seconds of the server's main thread (the event loop: HTTP, events), of the engine's
  worker thread (the model's steps and the choice of ids) and of the rest (the worker's OpenMP pool,
  which runs the parallel halves of the steps' matrix products);
- ``components``: each component's share of the Python threads' active samples (a sample inside the
  compiled step counts for "model step"); each sample goes to the first component that names one of its
  frames, innermost first (:data:`COMPONENTS`).
"""

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402
from serve_load import random_run, served, stream_load, thread_cpu  # noqa: E402

# (component, thread, frame patterns): the first whose thread matches and one of whose patterns is in a
# frame, looking from the innermost frame out.
COMPONENTS = [
    ("model step (compiled)", "worker", ["Stepper.step", "_Rows.step", "Engine._step"]),
    ("choosing ids (compiled draw, per-request decoding)", "worker", ["BatchChoice", "Decoding.choose"]),
    ("reading prompts", "worker", ["Engine._prime", "RunReader.prime"]),
    ("text, stop texts, log-probabilities", "worker", ["Decoding.read", "_Rows.read", "TextStream"]),
    ("engine bookkeeping (hop loop, batch rows)", "worker", ["charrnn/serve/engine.py"]),
    ("handing hops to the event loop", "worker", ["concurrent/futures", "asyncio/"]),
    ("JSON encoding", "main", ["json/encoder", "json/__init__"]),
    ("events: streams, chunks (charrnn)", "main", ["_events", "chunk", "pieces", "_merged", "Job._push",
                                                    "Metrics.pushed"]),
    ("request parsing and checks (pydantic, charrnn)", "main", ["pydantic", "read_request", "_parse",
                                                                 "encode_prompt", "check_limits"]),
    ("metrics", "main", ["prometheus_client", "MetricsMiddleware"]),
    ("HTTP (uvicorn, h11, starlette)", "main", ["uvicorn/", "h11/", "starlette/", "anyio/"]),
    ("event loop and sockets (asyncio)", "main", ["asyncio/", "selectors"]),
]


def classify(frames: list[str], thread: str) -> str:
    for frame in reversed(frames):
        for name, where, patterns in COMPONENTS:
            if where == thread and any(p in frame for p in patterns):
                return name
    return f"other ({thread} thread)"


def components(raw_path: str) -> tuple[dict, int]:
    """py-spy's raw (collapsed) stacks -> each component's share of the samples, and the samples."""
    counts, total = collections.Counter(), 0
    with open(raw_path) as f:
        for line in f:
            stack, n = line.rsplit(" ", 1)
            frames = stack.split(";")
            thread = ("worker" if "charrnn-generate" in frames[0] else
                      "main" if "MainThread" in frames[0] else "other")
            counts[classify(frames[1:], thread)] += int(n)
            total += int(n)
    return {k: round(v / total, 4) for k, v in counts.most_common()}, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--int8", action="store_true")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("serve_profile.py needs py-spy: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        run = random_run(tmp)
        with served(run, args.clients, args.int8) as (server, url):
            raw = os.path.join(tmp, "profile.txt")
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.pid), "--threads", "--format", "raw",
                                    "--rate", "200", "--nonblocking", "--duration", str(args.seconds), "-o", raw],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before, start, rounds, rates = thread_cpu(server.pid), time.monotonic(), 0, []
            while time.monotonic() - start < args.seconds:
                rates.append(asyncio.run(stream_load(url, args.clients, args.length))["chars_per_s"])
                rounds += 1
            after = thread_cpu(server.pid)
            spy.wait()
            shares, samples = components(raw)
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main_s = used.pop(server.pid, 0.0)
    # The worker is the busiest thread besides the main one; the rest are its OpenMP pool (and idle threads).
    worker_tid = max(used, key=used.get) if used else None
    worker_s = used.pop(worker_tid, 0.0) if worker_tid is not None else 0.0
    emit({"benchmark": "serve_profile", "clients": args.clients, "length": args.length, "int8": args.int8,
          "seconds": args.seconds, "rounds": rounds, "chars_per_s": sorted(rates)[len(rates) // 2] if rates else None,
          "threads_cpu_s": {"main (event loop)": round(main_s, 2), "engine worker": round(worker_s, 2),
                            "others (OpenMP pool)": round(sum(used.values()), 2)},
          "samples": samples, "components": shares, "machine": machine()})


if __name__ == "__main__":
    main()
