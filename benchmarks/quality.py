"""Validation loss reached on Tiny Shakespeare in a wall-clock budget, and with dynamic evaluation.

    python benchmarks/quality.py --minutes 20 [--preset NAME] [any `charrnn train` option]
                                 [--out DIR (default: a temporary directory)] [--dynamic [--dynamic-lr LR ...]]
    python benchmarks/quality.py --run DIR --dynamic [--dynamic-lr LR --dynamic-decay D --dynamic-segment N]

Trains with `--time-limit` = minutes x 60 (evaluation time included), then evaluates the
best weights in fp32 over the whole validation split (the last 10%, as nanoGPT) and
prints {"val_loss", "val_bpc", "chars_seen", "steps", "train_time_s", ...}.  With --dynamic the
same split is also read with dynamic evaluation ("dynamic_val_loss"; protocol in charrnn/dynamic.py);
with --run an existing run is evaluated instead of training one.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, peak_rss_mb  # noqa: E402

import charrnn  # noqa: E402
from charrnn.cli import _dynamic_options, add_options, build_parser  # noqa: E402
from charrnn.config import TrainConfig, option_names  # noqa: E402
from charrnn.options import DynamicOptions  # noqa: E402


def train(args, rest) -> tuple[str, dict]:
    out = args.out or tempfile.mkdtemp(prefix="charrnn-quality-")
    train_args = build_parser().parse_args(
        ["train", args.corpus, "--out", os.path.join(out, "run"), "--time-limit", str(args.minutes * 60), *rest])
    options = {name: getattr(train_args, name) for name in option_names(TrainConfig)}
    result = charrnn.train(args.corpus, train_args.out, preset=train_args.preset, force=train_args.force,
                           progress=not train_args.quiet, **options)
    return train_args.out, {"minutes": args.minutes, "preset": train_args.preset,
                            "best_val_loss_during_training": result.best_val_loss, "chars_seen": result.chars_seen,
                            "steps": result.step, "train_time_s": round(result.train_time, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float)
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--out")
    p.add_argument("--run", help="evaluate this run instead of training one")
    p.add_argument("--dynamic", action="store_true")
    add_options(p, DynamicOptions)
    args, rest = p.parse_known_args(argv)
    if (args.run is None) == (args.minutes is None):
        p.error("give --minutes (train, then evaluate) or --run (evaluate)")
    run, trained = (args.run, {}) if args.run else train(args, rest)
    lm = charrnn.load(run)
    ev = lm.evaluate(dynamic=_dynamic_options(args) if args.dynamic else None)
    cfg = json.loads(open(os.path.join(run, "config.json")).read())
    dynamic = {f"dynamic_{k}": round(v, 4) if isinstance(v, float) else v for k, v in ev.get("dynamic", {}).items()
               if k in ("loss", "bpc")} | {k: v for k, v in ev.get("dynamic", {}).items() if k.startswith("dynamic_")}
    emit({"benchmark": "quality", **trained, "val_loss": round(ev["loss"], 4), "val_bpc": round(ev["bpc"], 4),
          **dynamic, "run": run, "parameters": lm.model.num_parameters(), "training": cfg["training"],
          "peak_rss_mb": round(peak_rss_mb(), 1), **machine()})


if __name__ == "__main__":
    main()
