"""Fine-tuning from the shipped base model against training from scratch, at equal training time.

    python benchmarks/finetune.py --corpus FILE [--minutes 1 3 10] [--base base-en]

For each time budget: a run from random weights with the base model's architecture and dropout
and the same training options, and a run started from the base model (``--init-from``), each for that many
minutes of training (``--time-limit``; the machine otherwise quiet, so minutes of CPU time) on FILE. Prints one
JSON object: per budget, each run's best validation bits/char (FILE's last 10%) and a 300-character sample
(temperature 0.8, seed 0, prompt: the validation text's first 40 characters), and the difference.

FILE should be English prose neither the base model nor the tests have seen (base-en was trained on
Shakespeare, Nietzsche and War and Peace).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402

import charrnn  # noqa: E402
from charrnn import checkpoint as ckpt, shipped  # noqa: E402
from charrnn.sources import ARCHITECTURE  # noqa: E402

TRAINING = dict(seq_len=200, batch_size=32, lr_schedule="cosine", clip=1.0, val_fraction=0.1, sample_every=0)
LR = {"scratch": 3e-3, "base": 1e-3}       # from random weights a larger step; from the base a gentler one


def one(corpus: str, out: str, minutes: float, start: str, base: str) -> dict:
    if start == "base":
        options = dict(init_from=base)
    else:
        model = ckpt.read_config(shipped.resolve(base))["model"]
        options = {k: model[k] for k in ARCHITECTURE + ("dropout",)}     # the same model, randomly initialised
    result = charrnn.train(corpus, out, time_limit=minutes * 60, lr=LR[start], progress=False, log=lambda m: None,
                           **TRAINING, **options)
    lm = charrnn.load(out)
    val = lm.evaluate()
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    prompt = text[int(len(text) * (1 - TRAINING["val_fraction"])):][:40]
    sample = lm.generate(prompt, 300, temperature=0.8, seed=0)[0]
    return {"val_bpc": round(val["bpc"], 4), "steps": result.step, "sample": sample}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 3, 10])
    ap.add_argument("--base", default="base-en")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            runs = {start: one(args.corpus, os.path.join(tmp, f"{start}-{minutes}"), minutes, start, args.base)
                    for start in ("scratch", "base")}
            rows.append({"minutes": minutes, **runs,
                         "gain_bpc": round(runs["scratch"]["val_bpc"] - runs["base"]["val_bpc"], 4)})
    emit({"benchmark": "finetune", "corpus": args.corpus, "base": args.base, "training": TRAINING, "lr": LR,
          "results": rows, "machine": machine()})


if __name__ == "__main__":
    main()
