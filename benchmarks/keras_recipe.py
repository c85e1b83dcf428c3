"""The Keras Nietzsche recipe (seed 004) with `--preset keras-lstm`: losses and time per epoch, memory.

    python benchmarks/keras_recipe.py [--epochs 3] [any `charrnn train` option]

Prints {"epoch_loss": [...], "epoch_seconds": [...], "val_loss": [...], "peak_rss_mb", ...}.
The issue's reference (Keras 3 on a Zen 4 machine): training loss 2.48 / 1.96 / 1.75 after
epochs 1-3, 35-43 s per epoch, peak RSS 2.5 GB.  For a same-machine comparison run the example
itself: `benchmarks/peers/run_keras_lstm.sh --epochs 3` (on the 2-core Zen 3 CI machine: 84-86 s
per epoch, 2.28 GB).
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, peak_rss_mb  # noqa: E402

import charrnn  # noqa: E402
from charrnn.cli import TRAIN_OPTIONS, build_parser  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--corpus", default="nietzsche")
    p.add_argument("--out")
    args, rest = p.parse_known_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="charrnn-keras-")
    train_args = build_parser().parse_args(
        ["train", args.corpus, "--out", os.path.join(out, "run"), "--preset", "keras-lstm", "--epochs",
         str(args.epochs), "--sample-every", "0", *rest])
    options = {name: getattr(train_args, name) for name in TRAIN_OPTIONS}
    result = charrnn.train(args.corpus, train_args.out, preset=train_args.preset, force=train_args.force,
                           progress=not train_args.quiet, **options)
    records = [json.loads(x) for x in open(os.path.join(train_args.out, "metrics.jsonl"), encoding="utf-8")]
    epochs = [r for r in records if "epoch_loss" in r]
    vals = [r for r in records if "val_loss" in r]
    # An epoch's time: from the end of the one before (its evaluation included) to its last step.
    ends = [r["time"] for r in epochs]
    starts = [0.0] + ends[:-1]
    emit({"benchmark": "keras_recipe", "epochs": args.epochs, "steps": result.step,
          "epoch_loss": [round(r["epoch_loss"], 4) for r in epochs],
          "epoch_seconds": [round(b - a, 1) for a, b in zip(starts, ends)],
          "val_loss": [round(r["val_loss"], 4) for r in vals], "train_time_s": round(result.train_time, 1),
          "peak_rss_mb": round(peak_rss_mb(), 1), "run": train_args.out,
          "keras_reference": {"epoch_loss": [2.48, 1.96, 1.75], "epoch_seconds": "35-43", "peak_rss_mb": 2500},
          **machine()})


if __name__ == "__main__":
    main()
