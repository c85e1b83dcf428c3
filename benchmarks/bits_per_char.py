"""Characters, words and BPE subwords on one scale: validation bits per character after the same training time.

    python benchmarks/bits_per_char.py --corpus shakespeare --budget 600        # char, word, word+sampled, bpe
    python benchmarks/bits_per_char.py --step-time                               # 30,000 words: full vs sampled

The first form trains one model per tokenizer for --budget seconds each (the same model size, batch and
sequence length in tokens), then evaluates the best weights on the validation split, which is the same
text for every tokenizer; it prints one JSON object per run: vocabulary size, steps, tokens/s and
characters/s of training, validation bits/char and loss per token over the text the model predicts, and
the share of the validation characters inside [UNK] tokens (words outside a word vocabulary), which are
not scored: runs with different tokenizers score the same characters only where that share is 0, so the
character run also reports its bits/char over the characters a word run scores (val_bpc_outside_word_unk).  The
second form times one training step of a word-sized model (30,000 ids) with the full softmax and with
--sampled-softmax 1024.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, median_ms  # noqa: E402

import charrnn  # noqa: E402
from charrnn import tokenized  # noqa: E402
from charrnn.vocab import UNK_ID  # noqa: E402

CONFIGS = {
    "char": dict(tokenizer="char"),
    "word": dict(tokenizer="word"),
    "word-sampled": dict(tokenizer="word", sampled_softmax=1024),
    "bpe": dict(tokenizer="bpe"),
}


def train_one(corpus: str, name: str, budget: float, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = charrnn.train(corpus, f"{tmp}/run", progress=False, log=lambda msg: None, time_limit=budget,
                               epochs=None, hidden=args.hidden, embed=args.embed, seq_len=args.seq_len,
                               batch_size=args.batch_size, lr=args.lr, sample_every=0, eval_every=args.eval_every,
                               **CONFIGS[name])
        lm = charrnn.load(f"{tmp}/run")
        r = lm.evaluate()
        same = {"val_bpc_outside_word_unk": round(outside_word_unk(lm, corpus), 4)} if name == "char" else {}
        sample = lm.generate("\n", length=300, seed=1, temperature=0.8)[0]
    chars_per_token = (r["chars"] + r["unk_chars"]) / (r["tokens"] + r["unk_tokens"])   # of all the validation text
    tokens_per_s = result.chars_seen / result.train_time
    return {"benchmark": "tokenizers", "corpus": corpus, "config": name, "vocab": len(lm.vocab),
            "budget_s": budget, "steps": result.step, "tokens_per_s": round(tokens_per_s),
            "chars_per_s": round(tokens_per_s * chars_per_token), "val_bpc": round(r["bpc"], 4),
            "val_unk_share": round(r["unk_share"], 4), "val_loss_per_token": round(r["loss"], 4),
            "chars_per_token": round(chars_per_token, 3),
            "hidden": args.hidden, "embed": args.embed, "seq_len": args.seq_len, "batch_size": args.batch_size,
            **same, "sample": sample, **machine()}


def outside_word_unk(lm, corpus: str) -> float:
    """A character run's validation bits/char over the characters a word run (its default vocabulary) scores:
    all but those of the validation words it reads as ``[UNK]``, so that the two figures score the same text."""
    from charrnn.corpus import load_corpus
    from charrnn.evaluation import evaluate, held_out_ids

    ids, _ = held_out_ids(lm.config, lm.vocab)
    words = tokenized.split(load_corpus(corpus), lm.config["training"]["val_fraction"], "word").vocab
    found = words.tokenizer.encode(lm.vocab.decode_array(ids), add_special_tokens=False)
    scored = np.ones(len(ids), dtype=bool)
    for (a, b), i in zip(found.offsets, found.ids):
        if i == UNK_ID:
            scored[a:b] = False
    return evaluate(lm.model, ids, device=lm.device, scored=scored)["bpc"]


def step_time(args) -> None:
    from charrnn.config import TrainConfig
    from charrnn.models import CharLM, ModelConfig
    from charrnn.ops.sampled_softmax import unigram
    from charrnn.training import make_optimizer, train_step

    vocab = 30_000
    counts = (1e6 / torch.arange(1, vocab + 1).double()).round()       # Zipfian word counts
    x = torch.multinomial(counts.float(), args.batch_size * args.seq_len, replacement=True)
    x = x.view(args.batch_size, args.seq_len)
    y = torch.roll(x, -1, 1)
    for k in (0, 1024):
        torch.manual_seed(0)
        model = CharLM(ModelConfig(vocab, "gru", args.embed, args.hidden, 1))
        opt = make_optimizer(TrainConfig(), model)
        sampled = (unigram(counts), k) if k else None
        times = []
        for i in range(3 + args.steps):
            t = time.perf_counter()
            loss, _ = train_step(model, opt, x, y, 5.0, torch.device("cpu"), None, sampled=sampled)
            float(loss)
            if i >= 3:
                times.append(time.perf_counter() - t)
        emit({"benchmark": "tokenizers_step", "vocab": vocab, "sampled_softmax": k, "hidden": args.hidden,
              "embed": args.embed, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "ms_per_step_median": round(median_ms(times), 1), **machine()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--budget", type=float, default=600, help="training seconds per run")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--steps", type=int, default=10, help="--step-time: timed steps")
    p.add_argument("--step-time", action="store_true")
    args = p.parse_args(argv)
    if args.step_time:
        return step_time(args)
    for name in args.configs.split(","):
        emit(train_one(args.corpus, name, args.budget, args))


if __name__ == "__main__":
    main()
