"""Export to ONNX and generate with onnxruntime: export and load times, generation speed next to
the PyTorch sampler's, and (with --run) the quality cost of int8 weights.

    python benchmarks/export_speed.py [--batch-size 1 5 64] [--length 1000] [--repeats 3] [--threads 0 1 2]
                                      [--run DIR]

Uses the default model (GRU 1024, embedding 256, vocabulary 66) with random weights unless --run
names a trained run.  Generation is measured as in benchmarks/sample_speed.py (prompt "ROMEO:",
sampling at temperature 1 included, aggregate characters per second); the repeats of every
configuration are interleaved (torch fp32, torch int8, onnxruntime fp32, int8, ... then again) so
that load from other processes on the machine spreads over all of them, and medians are reported.
``--threads``: onnxruntime intra-op thread counts to try (0: onnxruntime's default, one per
physical core).  With --run, also the validation bits/char of every weight format, computed
through each one's own one-step model (64 streams over the run's validation split).
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, peak_rss_mb  # noqa: E402
from sample_speed import default_model  # noqa: E402

from charrnn import checkpoint as ckpt  # noqa: E402
from charrnn import runtime  # noqa: E402
from charrnn.export import export_onnx  # noqa: E402
from charrnn.sampling import Sampler  # noqa: E402


def save_run(model, vocab, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    ckpt.write_config(path, {"model": model.config.to_dict(), "corpus": {}})
    vocab.save(path / ckpt.VOCAB)
    ckpt.save_weights(path / ckpt.LATEST, model, 0)


def measured_run(run_arg, tmp: Path):
    """(run directory, model, vocabulary): --run's, or the default model with random weights saved under tmp."""
    if run_arg:
        loaded = ckpt.load_run(run_arg)
        return Path(run_arg), loaded.model, loaded.vocab
    model, vocab = default_model()
    save_run(model, vocab, tmp / "run")
    return tmp / "run", model, vocab


def rate(stream, batch: int) -> tuple[float, float]:
    """(aggregate chars/s, first character in ms) of one pass over a stream_ids iterator."""
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in stream:
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    return batch * n / (time.perf_counter() - t0), first * 1000


def val_bpc_onnx(lm, x, y) -> float:
    state = lm.zero_state(x.shape[0])
    total = 0.0
    for t in range(x.shape[1]):
        logits, state = lm.step(x[:, t], state)
        logits = logits.astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        keep = y[:, t] >= 0
        total -= logp[keep, y[keep, t]].sum()
    return total / int((y >= 0).sum()) / math.log(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 5, 64])
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[0], help="onnxruntime intra-op threads to try")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch sampler")
    p.add_argument("--run", help="a trained run directory (default: the default model, random weights)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="charrnn-export-bench-"))
    run, model, vocab = measured_run(args.run, tmp)

    # Export and load times (medians of 3; export includes reading the run's weights).
    files, export_s, load_s, sizes = {}, {}, {}, {}
    for weights in ("fp32", "int8"):
        out = tmp / f"{weights}.onnx"
        times = []
        for _ in range(3):
            times.append(export_onnx(run, out, int8=weights == "int8", force=True).seconds)
        export_s[weights] = round(statistics.median(times), 3)
        sizes[weights] = round(out.stat().st_size / 1e6, 2)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            runtime.load(out)
            times.append(time.perf_counter() - t)
        load_s[weights] = round(statistics.median(times), 3)
        files[weights] = out

    # Generation: every configuration once per round, rounds repeated.
    configs = {}
    if not args.no_torch:
        for weights in ("fp32", "int8"):
            sampler = Sampler(model, vocab, weights=weights)
            configs[f"torch-{weights}"] = lambda b, seed, s=sampler: s.stream_ids(["ROMEO:"] * b, args.length,
                                                                                  seed=seed)
    for weights, path in files.items():
        for threads in args.threads:
            lm = runtime.load(path, threads=threads or None)
            name = f"onnxruntime-{weights}" + (f"-threads{threads}" if threads else "")
            configs[name] = lambda b, seed, m=lm: m.stream_ids(["ROMEO:"] * b, args.length, seed=seed)
    for make in configs.values():  # warm-up
        rate(make(1, 0), 1)
    samples = {(name, b): [] for name in configs for b in args.batch_size}
    for r in range(args.repeats):
        for b in args.batch_size:
            for name, make in configs.items():
                samples[name, b].append(rate(make(b, r), b))
                print(f"round {r + 1}/{args.repeats} batch {b} {name}: {samples[name, b][-1][0]:,.0f} chars/s",
                      file=sys.stderr, flush=True)
    results = []
    for (name, b), vals in samples.items():
        rates = [v[0] for v in vals]
        results.append({"engine": name, "batch_size": b, "chars_per_s": round(statistics.median(rates), 1),
                        "min": round(min(rates), 1), "max": round(max(rates), 1),
                        "first_char_ms": round(statistics.median(v[1] for v in vals), 2)})

    out = {"benchmark": "export_speed", "length": args.length, "repeats": args.repeats,
           "parameters": model.num_parameters(), "export_s": export_s, "load_s": load_s, "file_mb": sizes,
           "results": results}
    if args.run:  # quality cost of each weight format, through its own one-step model
        from charrnn.corpus import load_corpus
        from charrnn.data import eval_streams, split_train_val

        config = ckpt.read_config(run)
        cfg = config["training"]
        data = load_corpus(config["corpus"]["name"], lowercase=cfg["lowercase"],
                           newlines_to_spaces=cfg["newlines_to_spaces"], progress=False)
        _, val = split_train_val(data.reencode(vocab), cfg["val_fraction"])
        x, y = (t.long().numpy() for t in eval_streams(val, 64))
        out["val_bpc"] = {w: round(val_bpc_onnx(runtime.load(f), x, y), 5) for w, f in files.items()}
    import onnxruntime

    emit({**out, "onnxruntime": onnxruntime.__version__, "peak_rss_mb": round(peak_rss_mb(), 1), **machine()})


if __name__ == "__main__":
    main()
