"""Server throughput: N clients at once against `charrnn serve`, against one request after another.

    python benchmarks/serve_load.py [--clients 1 8 50] [--length 300] [--run DIR] [--int8]
    python benchmarks/serve_load.py --api completions [--clients 1 16 64]

With ``--api completions`` the clients stream through the OpenAI-compatible ``POST /v1/completions`` of
a `charrnn serve` process instead: per client count, aggregate characters per second, the p50 / p99 time to first character and
the p50 / p99 time between characters (a chunk's wait shared by its characters), and the server
process's CPU seconds per 1,000 characters (from ``/proc``; ``event_loop`` is its main thread's share,
the rest the engine's worker and the threads of its matrix products) beside the raw sampler's
(``Sampler.stream_ids`` at the same batch size, in this process before the server starts, in the same sitting); then the time to
first character of 20 requests one after another (median, min, max), and of a 2,000-character prompt read
cold and from the prompt cache (medians of 5).

Starts the real server (uvicorn, a free localhost port) on the default model (GRU 1024,
embedding 256, vocabulary 66; random weights unless --run names a trained run), sends
``clients`` POST /v1/generate requests at once (``length`` characters, one sample, distinct
seeds), and compares with generating the same requests one after another in-process, which
is what a server without batching can do at best.  Prints one JSON object: per client count,
aggregate chars_per_s of the server and of the sequential baseline, and the median and
slowest request latency.
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import uvicorn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402
from sample_speed import default_model  # noqa: E402

import charrnn  # noqa: E402
from charrnn import checkpoint  # noqa: E402
from charrnn.threads import INTERVAL_S  # noqa: E402
from charrnn.serve import Limits, bind, create_app  # noqa: E402


def random_run(path) -> str:
    model, vocab = default_model()
    checkpoint.write_config(path, {"model": model.config.to_dict(), "corpus": {"name": "random weights"}})
    vocab.save(os.path.join(path, checkpoint.VOCAB))
    checkpoint.save_weights(os.path.join(path, checkpoint.LATEST), model, 0)
    return path


async def load(url, clients, length):
    async def one(client, seed):
        t = time.perf_counter()
        r = await client.post("/v1/generate", json={"prompt": "ROMEO:", "length": length, "seed": seed})
        r.raise_for_status()
        return time.perf_counter() - t

    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        t = time.perf_counter()
        latencies = await asyncio.gather(*(one(client, s) for s in range(clients)))
        return time.perf_counter() - t, latencies


async def stream_one(client, body: dict) -> tuple[float, list[float], int]:
    """One streamed completion: time to first character, the wait per character after it, characters."""
    start = last = time.perf_counter()
    first, waits, chars = None, [], 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            text = choices[0]["text"] if choices else ""
            if not text:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                waits += [(now - last) / len(text)] * len(text)
            last, chars = now, chars + len(text)
    return first, waits, chars


async def stream_load(url, clients, length):
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        t = time.perf_counter()
        got = await asyncio.gather(*(stream_one(client, {"prompt": "ROMEO:", "max_tokens": length, "seed": s})
                                     for s in range(clients)))
        wall = time.perf_counter() - t
    firsts = sorted(g[0] for g in got)
    waits = sorted(w for g in got for w in g[1])
    def ms(xs, q, digits):
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], digits) if xs else None

    return {"chars_per_s": round(sum(g[2] for g in got) / wall),
            "first_char_ms_p50": ms(firsts, 0.5, 1), "first_char_ms_p99": ms(firsts, 0.99, 1),
            "char_gap_ms_p50": ms(waits, 0.5, 2), "char_gap_ms_p99": ms(waits, 0.99, 2)}


async def first_chars(url, requests: int = 20) -> dict:
    """Time to first character of ``requests`` streamed requests sent one after another, each on a new
    connection (as the load's are): median and spread."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        times = sorted([(await stream_one(client, {"prompt": "ROMEO:", "max_tokens": 20, "seed": i}))[0]
                        for i in range(requests)])
    return {"requests": requests, "first_char_ms_median": round(1000 * statistics.median(times), 2),
            "first_char_ms_min": round(1000 * times[0], 2), "first_char_ms_max": round(1000 * times[-1], 2)}


async def cache_first_char(url) -> dict:
    """Time to first character of a 2,000-character prompt, read cold and then from the prompt cache."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        cold, cached = [], []
        for i in range(5):
            body = {"prompt": f"{i} " + "ROMEO: what light through yonder window breaks? " * 42, "max_tokens": 5}
            body["prompt"] = body["prompt"][:2000]
            cold.append((await stream_one(client, body))[0])
            cached.append((await stream_one(client, body))[0])
    return {"prompt_chars": 2000, "cold_first_char_ms": round(1000 * statistics.median(cold), 2),
            "cached_first_char_ms": round(1000 * statistics.median(cached), 2)}


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid``, from ``/proc``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:        # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def server_cpu(pid: int, run, *args) -> tuple[object, dict]:
    """``run(*args)``'s result and the server's CPU seconds while it ran: in all, and in its main thread."""
    before = thread_cpu(pid)
    out = run(*args)
    after = thread_cpu(pid)
    total = sum(after.values()) - sum(before.get(t, 0.0) for t in after)
    return out, {"all": total, "event_loop": after.get(pid, 0.0) - before.get(pid, 0.0)}


def raw_sampler(lm, batch: int, length: int, repeats: int = 3) -> dict:
    """The sampler alone at ``batch`` rows of ``length`` characters: chars/s and CPU seconds per 1,000 (medians
    of ``repeats``)."""
    sampler = lm.sampler
    for _ in sampler.stream_ids(["ROMEO:"] * batch, 20, seed=0):   # warm-up
        pass
    rates, cpus = [], []
    for r in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for ids in sampler.stream_ids(["ROMEO:"] * batch, length, seed=r):
            pass
        ids.tolist()
        rates.append(batch * length / (time.perf_counter() - wall))
        cpus.append(1000 * (time.process_time() - cpu) / (batch * length))
    return {"chars_per_s": round(statistics.median(rates)), "cpu_s_per_1000_chars": round(statistics.median(cpus), 4)}


@contextlib.contextmanager
def served(run: str, clients: int, int8: bool):
    """`charrnn serve RUN` in a process of its own (a client parsing thousands of events in the server's process
    would take its interpreter lock from the generation loop), warmed up and past its start: ``(process, url)``."""
    server = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", run, "--port", "0", "--log-level", "error",
                               "--max-queue", str(clients + 10), "--max-batch", str(max(64, clients))]
                              + (["--int8"] if int8 else []), stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://[^/]+", server.stderr.readline()).group(0)
        asyncio.run(stream_load(url, 1, 20))  # warm-up
        # A server runs for long: measure past its start, whose thread count is a guess from the threads runnable
        # then (this benchmark's warm-up client among them) until the engine's policy re-decides from CPU time.
        time.sleep(2 * INTERVAL_S)
        yield server, url
    finally:
        server.terminate()
        server.wait(30)


def streamed(run: str, args, lm) -> dict:
    """The streaming figures, against `charrnn serve` in a process of its own (:func:`served`)."""
    # Before the server starts: its threads (still spinning after a run) would count as a competing process.
    raws = {n: raw_sampler(lm, n, args.length) for n in args.clients}
    with served(run, max(args.clients), args.int8) as (server, url):
        results = {}
        for n in args.clients:
            client_cpu = time.process_time()
            got, cpu = server_cpu(server.pid, lambda: asyncio.run(stream_load(url, n, args.length)))
            client_cpu = time.process_time() - client_cpu
            chars = n * args.length
            raw = raws[n]
            per_1000 = round(1000 * cpu["all"] / chars, 4)
            results[str(n)] = {**got, "cpu_s_per_1000_chars": per_1000,
                               "event_loop_cpu_share": round(cpu["event_loop"] / max(cpu["all"], 1e-9), 3),
                               "client_cpu_s_per_1000_chars": round(1000 * client_cpu / chars, 4),
                               "raw_sampler": raw, "share_of_raw": round(got["chars_per_s"] / raw["chars_per_s"], 3),
                               "cpu_vs_raw": round(per_1000 / raw["cpu_s_per_1000_chars"], 2)}
        results["first_char_1_client"] = asyncio.run(first_chars(url))
        results["prompt_cache"] = asyncio.run(cache_first_char(url))
        return results


def in_process(lm, args) -> dict:
    """``/v1/generate`` of a server in this process, against the same requests one after another."""
    app = create_app(lm, Limits(max_queue=max(args.clients) + 10, max_batch=max(64, max(args.clients))))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    results = {}
    try:
        asyncio.run(load(url, 1, 20))  # warm-up
        for n in args.clients:
            t = time.perf_counter()
            for seed in range(n):
                lm.generate("ROMEO:", args.length, seed=seed)
            sequential = time.perf_counter() - t
            wall, latencies = asyncio.run(load(url, n, args.length))
            chars = n * args.length
            results[str(n)] = {
                "server_chars_per_s": round(chars / wall),
                "sequential_chars_per_s": round(chars / sequential),
                "speedup": round(sequential / wall, 2),
                "median_latency_s": round(statistics.median(latencies), 3),
                "max_latency_s": round(max(latencies), 3),
                "peak_running": app.state.engine.stats["peak_running"],
            }
    finally:
        server.should_exit = True
        thread.join(10)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 50])
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--run")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--api", choices=["generate", "completions"], default="generate")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or random_run(tmp)
        lm = charrnn.load(run, int8=args.int8)
        results = streamed(run, args, lm) if args.api == "completions" else in_process(lm, args)
    emit({"benchmark": "serve_load", "api": args.api, "length": args.length, "int8": args.int8,
          "model": "random default" if not args.run else args.run, "clients": results, "machine": machine()})


if __name__ == "__main__":
    main()
