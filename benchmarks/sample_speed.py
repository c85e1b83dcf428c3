"""Generation speed: 1000 characters per sample from the prompt "ROMEO:", sampling included.

    python benchmarks/sample_speed.py [--batch-size 1 5 64] [--length 1000] [--run DIR] [--repeats 3]
                                      [--weights fp32 int8] [--backend auto|native|python]

Uses the default model (GRU 1024, embedding 256, vocabulary 66) with random weights unless
--run names a trained run.  Prints one JSON object with, per weight format and batch size,
aggregate chars_per_s (median of the repeats), first_char_ms, the step's backend (the
compiled one, charrnn.native, or pure PyTorch) and peak_rss_mb.  With --run, also the
validation bits/char computed through the sampling step (the quality cost of int8).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, peak_rss_mb  # noqa: E402

from charrnn.models import CharLM, ModelConfig  # noqa: E402
from charrnn.sampling import Sampler  # noqa: E402
from charrnn.vocab import Vocab  # noqa: E402


def default_model():
    torch.manual_seed(0)
    chars = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    vocab = Vocab(chars)
    return CharLM(ModelConfig(len(vocab))), vocab


def measure(sampler, batch, length, temperature=1.0, repeats=3):
    rates, firsts = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        first = None
        n = 0
        for ids in sampler.stream_ids(["ROMEO:"] * batch, length, temperature=temperature, seed=r):
            if first is None:
                first = time.perf_counter() - t0
            n += 1
        ids.tolist()
        total = time.perf_counter() - t0
        rates.append(batch * n / total)
        firsts.append(first * 1000)
    return {"batch_size": batch, "chars_per_s": round(statistics.median(rates), 1),
            "first_char_ms": round(statistics.median(firsts), 2)}


@torch.inference_mode()
def stepwise_val_bpc(sampler, loaded, streams=64):
    """Validation bits/char computed with the sampling step (so int8 weights are what is measured)."""
    import math

    from charrnn.corpus import load_corpus
    from charrnn.data import eval_streams, split_train_val

    train_cfg = loaded.config["training"]
    data = load_corpus(loaded.config["corpus"]["name"], lowercase=train_cfg["lowercase"],
                       newlines_to_spaces=train_cfg["newlines_to_spaces"], progress=False)
    _, val = split_train_val(data.reencode(loaded.vocab), train_cfg["val_fraction"])
    x, y = eval_streams(val, streams)
    stepper = sampler.stepper
    state = stepper.from_module_state(loaded.model.zero_state(x.shape[0]))
    total = 0.0
    for t in range(x.shape[1]):
        logits, state = stepper.step(x[:, t].long(), state)
        total += float(torch.nn.functional.cross_entropy(logits, y[:, t].long(), ignore_index=-100, reduction="sum"))
    return total / int((y >= 0).sum()) / math.log(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 5, 64])
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run", help="a trained run directory (default: the default model, random weights)")
    p.add_argument("--weights", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"],
                   help="weight formats of the sampling step to measure")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "python"],
                   help="the compiled step (native), pure PyTorch (python), or whichever is available (auto)")
    args = p.parse_args(argv)
    if args.run:
        from charrnn.checkpoint import load_run

        loaded = load_run(args.run)
        model, vocab = loaded.model, loaded.vocab
    else:
        model, vocab = default_model()
    results = []
    for weights in args.weights:
        sampler = Sampler(model, vocab, weights=weights, backend=args.backend)
        measure(sampler, 1, 50, repeats=1)  # warm-up
        for b in args.batch_size:
            results.append({"weights": weights, "backend": sampler.stepper.backend,
                            **measure(sampler, b, args.length, repeats=args.repeats)})
        if args.run:  # the quality cost of the weight format, through the sampling step itself
            results[-1]["val_bpc_stepwise"] = round(stepwise_val_bpc(sampler, loaded), 4)
    emit({"benchmark": "sample_speed", "length": args.length, "parameters": model.num_parameters(),
          "results": results, "peak_rss_mb": round(peak_rss_mb(), 1), **machine()})


if __name__ == "__main__":
    main()
