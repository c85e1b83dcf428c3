"""One model for three labelled corpora against three models, at equal CPU time.

    python benchmarks/labels.py [--minutes 6] [--data ../shared/data] [--chars 1115394] [--label-on input]

The labels are Shakespeare, Nietzsche and War and Peace (each cut to its first --chars characters, so that they
weigh alike). The conditioned model trains --minutes on all three (`charrnn train DIR --labels`); each separate
model trains a third of that on its own corpus, with the same model and optimiser options. Then:

(a) each label's validation text (the last 10% of its corpus) scored by the conditioned model under every label:
    its own label must be the lowest, by at least 0.2 bits/char;
(b) the conditioned model's mean bits/char over the three labels (each under its own) beside the separate models'
    mean, which it should come within 0.03 of;
(c) 3,000 characters generated under each label (temperature 0.8, seed 1) scored by the three separate models: the
    separate model of the same label should find it the likeliest (lowest bits/char).

JSON on stdout; progress on stderr.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402

import charrnn  # noqa: E402
from charrnn.evaluation import evaluate, label_parts  # noqa: E402
from charrnn.labels import load_labelled  # noqa: E402

CORPORA = {"shakespeare": "tinyshakespeare.txt", "nietzsche": "nietzsche.txt", "warpeace": "warpeace.txt"}
MODEL = dict(hidden=512, embed=128, seq_len=100, batch_size=32, lr=3e-3, lr_schedule="cosine", clip=1.0,
             sample_every=0, progress=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_corpus(data: Path, root: Path, chars: int) -> Path:
    for label, name in CORPORA.items():
        (root / label).mkdir(parents=True)
        text = (data / name).read_text(encoding="utf-8")[:chars]
        (root / label / f"{label}.txt").write_text(text, encoding="utf-8")
    return root


def bits_per_char(lm, text: str) -> float:
    """A separate model's bits/char over ``text`` (characters it does not know are not scored)."""
    ids = lm.vocab.encode(text)
    return evaluate(lm.model, ids)["bpc"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--chars", type=int, default=1_115_394)
    p.add_argument("--label-on", default="input", choices=["input", "state", "both"])
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--separate", help="reuse the separate models of an earlier sitting's --out folder (same options), "
                                      "to compare --label-on variants without training them again")
    args = p.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="charrnn-labels-bench-"))
    corpus = build_corpus(Path(args.data), root / "corpus", args.chars)
    seconds = args.minutes * 60

    log(f"conditioned model, {args.minutes} min, label on {args.label_on}")
    charrnn.train(str(corpus), root / "conditioned", labels=True, label_on=args.label_on, time_limit=seconds,
                  log=lambda m: None, **MODEL)
    separate = {}
    for label in CORPORA:
        if args.separate:
            separate[label] = charrnn.load(Path(args.separate) / label)
            continue
        log(f"separate model {label}, {args.minutes / 3:.2f} min")
        charrnn.train(str(corpus / label), root / label, time_limit=seconds / 3, log=lambda m: None, **MODEL)
        separate[label] = charrnn.load(root / label)

    lm = charrnn.load(root / "conditioned")
    parts = label_parts(load_labelled(str(corpus), progress=False).splits(0.1, lm.vocab), lm.vocab)
    names = lm.labels
    crossed = {names[k]: {names[j]: round(evaluate(lm.model, ids, label=j)["bpc"], 4) for j in parts}
               for k, (ids, _, _) in parts.items()}
    margins = {text: round(min(v for j, v in row.items() if j != text) - row[text], 4) for text, row in crossed.items()}
    own = {label: crossed[label][label] for label in CORPORA}
    alone = {label: round(separate[label].evaluate()["bpc"], 4) for label in CORPORA}
    generated = {label: lm.generate("\n", 3000, temperature=0.8, seed=1, label=label)[0] for label in CORPORA}
    judged = {label: {judge: round(bits_per_char(separate[judge], text), 4) for judge in CORPORA}
              for label, text in generated.items()}
    result = {
        "benchmark": "labels", "minutes": args.minutes, "chars_per_corpus": args.chars, "label_on": args.label_on,
        "model": {k: v for k, v in MODEL.items() if k not in ("sample_every", "progress")},
        "a_val_bpc_by_text_and_label": crossed, "a_margin_own_vs_best_other": margins,
        "a_met": all(m >= 0.2 for m in margins.values()),
        "b_conditioned_own_label": own, "b_separate": alone,
        "b_mean_conditioned": round(float(np.mean(list(own.values()))), 4),
        "b_mean_separate": round(float(np.mean(list(alone.values()))), 4),
        "c_generated_scored_by_separate_models": judged,
        "c_met": all(min(row, key=row.get) == label for label, row in judged.items()),
        "samples": {label: text[:300] for label, text in generated.items()},
        "out": str(root),
    }
    result["b_gap"] = round(result["b_mean_conditioned"] - result["b_mean_separate"], 4)
    result["b_met"] = result["b_gap"] <= 0.03
    result["steps"] = {name: json.loads(line)["step"] for name, folder in
                       (("conditioned", root), *((c, Path(args.separate or root)) for c in CORPORA))
                       for line in (folder / name / "metrics.jsonl").read_text().splitlines()[-1:]}
    emit({**result, **machine()})


if __name__ == "__main__":
    main()
