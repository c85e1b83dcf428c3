"""Validation loss reached on Tiny Shakespeare in a wall-clock budget.

    python benchmarks/quality.py --minutes 20 [--preset NAME] [any `charrnn train` option]
                                 [--out DIR (default: a temporary directory)]

Trains with `--time-limit` = minutes x 60 (evaluation time included), then evaluates the
best weights in fp32 over the whole validation split (the last 10%, as nanoGPT) and
prints {"val_loss", "val_bpc", "chars_seen", "steps", "train_time_s", ...}.
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
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--out")
    args, rest = p.parse_known_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="charrnn-quality-")
    train_args = build_parser().parse_args(
        ["train", args.corpus, "--out", os.path.join(out, "run"), "--time-limit", str(args.minutes * 60), *rest])
    options = {name: getattr(train_args, name) for name in TRAIN_OPTIONS}
    result = charrnn.train(args.corpus, train_args.out, preset=train_args.preset, force=train_args.force,
                           progress=not train_args.quiet, **options)
    lm = charrnn.load(train_args.out)
    ev = lm.evaluate()
    cfg = json.loads(open(os.path.join(train_args.out, "config.json")).read())
    emit({"benchmark": "quality", "minutes": args.minutes, "preset": train_args.preset,
          "val_loss": round(ev["loss"], 4), "val_bpc": round(ev["bpc"], 4),
          "best_val_loss_during_training": result.best_val_loss, "chars_seen": result.chars_seen,
          "steps": result.step, "train_time_s": round(result.train_time, 1), "run": train_args.out,
          "parameters": lm.model.num_parameters(), "training": cfg["training"],
          "peak_rss_mb": round(peak_rss_mb(), 1), **machine()})


if __name__ == "__main__":
    main()
