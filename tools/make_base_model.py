"""Train and package charrnn's shipped base character model, ``base-en``, from public-domain English text.

    python tools/make_base_model.py train --data ../shared/data --minutes 25 --out runs/base-en
    python tools/make_base_model.py package runs/base-en        # -> charrnn/base_models/en/ and its CARD.md

The text: Tiny Shakespeare, Nietzsche's *Beyond Good and Evil* (Helen Zimmern's translation) and Tolstoy's *War
and Peace* (the Maudes' translation), all public domain (Project Gutenberg), each without its last 10%, which
the card's figures are measured on: the model never saw it.  ``train`` concatenates the first 90% of each (in
that order, a blank line between) and trains a GRU on it for ``--minutes`` of CPU time.  ``package`` evaluates the
run on each text's last 10% (as ``charrnn eval base-en --corpus NAME --val-fraction 0.1`` does), stores the
weights in fp16 when that moves no figure by 0.005 bits/char or more (else fp32), and writes the card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import charrnn  # noqa: E402
from charrnn import checkpoint as ckpt  # noqa: E402

TEXTS = {"shakespeare": "tinyshakespeare.txt", "nietzsche": "nietzsche.txt", "warpeace": "warpeace.txt"}
HELD_OUT = 0.1
OUT = ROOT / "charrnn" / "base_models" / "en"
# The model and its training: small enough to ship (about 2 MB in fp16) and to train in minutes on a laptop.
MODEL = dict(arch="gru", hidden=512, embed=64, layers=1)
TRAINING = dict(seq_len=200, batch_size=32, lr=3e-3, lr_schedule="cosine", clip=1.0, val_fraction=0.02,
                eval_every=500, sample_every=0)


def train(args) -> None:
    parts = []
    for name, file in TEXTS.items():
        text = (Path(args.data) / file).read_text(encoding="utf-8")
        parts.append(text[: int(len(text) * (1 - HELD_OUT))])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "base-en-train.txt"
        corpus.write_text("\n\n".join(parts), encoding="utf-8")
        charrnn.train(str(corpus), args.out, time_limit=args.minutes * 60, **MODEL, **TRAINING)


def evaluate(run: Path, data: str) -> dict[str, float]:
    """Bits per character on each text's held-out last 10%, read as training read it (newlines as LF: War and Peace's
    file has CRLF); for a file with LF alone, what ``charrnn eval --corpus FILE --val-fraction 0.1`` prints."""
    lm = charrnn.load(run)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in TEXTS.items():
            text = Path(tmp) / file
            text.write_text((Path(data) / file).read_text(encoding="utf-8"), encoding="utf-8")
            out[name] = round(lm.evaluate(str(text), val_fraction=HELD_OUT)["bpc"], 4)
    return out


def package(args) -> None:
    run = Path(args.run)
    loaded = ckpt.load_run(run)
    full = evaluate(run, args.data)
    with tempfile.TemporaryDirectory() as tmp:
        half = Path(tmp) / "half"
        half.mkdir()
        for name in (ckpt.CONFIG, ckpt.VOCAB):
            shutil.copy(run / name, half / name)
        state = {k: v.half().contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(half / ckpt.LATEST))
        fp16 = evaluate(half, args.data)
        use_fp16 = all(abs(fp16[k] - full[k]) < 0.005 for k in full)
        OUT.mkdir(parents=True, exist_ok=True)
        config = json.loads((run / ckpt.CONFIG).read_text(encoding="utf-8"))
        # A description, not a name: no file of that name exists, so `charrnn eval base-en` asks for --corpus.
        config["corpus"] = {"description": "base-en: the first 90% of " + ", ".join(TEXTS.values())}
        ckpt.write_config(OUT, {k: v for k, v in config.items() if k != "format_version"})
        shutil.copy(run / ckpt.VOCAB, OUT / ckpt.VOCAB)
        if use_fp16:
            shutil.copy(half / ckpt.LATEST, OUT / ckpt.LATEST)
        else:
            save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(OUT / ckpt.LATEST))
    card(run, loaded, full, fp16, use_fp16, args)
    print(json.dumps({"fp32": full, "fp16": fp16, "stored": "fp16" if use_fp16 else "fp32"}))


def card(run: Path, loaded, full: dict, fp16: dict, use_fp16: bool, args) -> None:
    metrics = [json.loads(line) for line in (run / ckpt.METRICS).read_text().splitlines()]
    steps = max((m.get("step", 0) for m in metrics), default=0)
    minutes = max((m.get("time", 0) for m in metrics), default=0) / 60
    size = (OUT / ckpt.LATEST).stat().st_size
    kind = "fp16" if use_fp16 else "fp32"
    stored = fp16 if use_fp16 else full
    rows = "\n".join(f"| {name} | {full[name]:.4f} | {fp16[name]:.4f} |" for name in TEXTS)
    model = loaded.model
    text = f"""# base-en: charrnn's English base character model

`charrnn train MY.txt --out DIR --init-from base-en` fine-tunes it on your text; `charrnn generate base-en`
samples from it.

- **Model**: GRU, {MODEL['layers']} layer of {MODEL['hidden']} units, embedding {MODEL['embed']}:
  {model.num_parameters():,} parameters, {len(loaded.vocab)} ids (the characters of its text and `[UNK]`).
  Weights stored in {kind} ({size / 1e6:.1f} MB).
- **Data**: the first 90% of Tiny Shakespeare, Nietzsche's *Beyond Good and Evil* (Helen Zimmern's
  translation) and Tolstoy's *War and Peace* (the Maudes' translation), public domain (Project
  Gutenberg), newlines as `\\n`, concatenated. The last 10% of each was never trained on.
- **Training**: {steps:,} steps in {minutes:.0f} minutes on a 2-core CPU, `{json.dumps({**MODEL, **TRAINING})}`.
  Made by `python tools/make_base_model.py train` and `package`.
- **Licence**: the texts are in the public domain; the weights are released with charrnn, under its MIT
  licence.

Bits per character on each text's held-out last 10% (`charrnn eval base-en --corpus shakespeare
--val-fraction 0.1`, and `nietzsche`; War and Peace's file with its `\\r\\n` turned into `\\n`):

| text | fp32 | fp16 |
|---|---|---|
{rows}

The stored weights are the {kind} ones: {', '.join(f'{k} {v:.4f}' for k, v in stored.items())}.
"""
    (OUT / "CARD.md").write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    t.add_argument("--minutes", type=float, default=25)
    t.add_argument("--out", default="runs/base-en")
    p = sub.add_parser("package")
    p.add_argument("run")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    torch.manual_seed(0)
    train(args) if args.command == "train" else package(args)


if __name__ == "__main__":
    main()
