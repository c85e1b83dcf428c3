"""The baseline: a plain PyTorch transcription of the TensorFlow tutorial, measured like ours.

nn.Embedding(66, 256) -> nn.GRU(256, 1024) -> nn.Linear(1024, 66); a textbook training step
(forward, cross-entropy, zero_grad, backward, Adam step); generation calls nn.GRU once per
character and samples in Python step by step (the tutorial's OneStep loop).

    python benchmarks/reference.py [--steps 20] [--length 1000] [--skip-train]

Prints one JSON object: train chars_per_s / ms_per_step_median, generation chars_per_s at
batch 1 and 5, peak_rss_mb.
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, median_ms, peak_rss_mb  # noqa: E402

V, E, H = 66, 256, 1024


class Tutorial(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, E)
        self.gru = nn.GRU(E, H, batch_first=True)
        self.dense = nn.Linear(H, V)

    def forward(self, x, state=None):
        y, state = self.gru(self.embedding(x), state)
        return self.dense(y), state


@torch.no_grad()
def one_step_generate(model, batch, length, temperature=1.0):
    """The tutorial's OneStep: run the prompt, then one nn.GRU call per character."""
    prompt = torch.randint(1, V, (batch, 6))
    logits, state = model(prompt)
    logits = logits[:, -1]
    mask = torch.zeros(V)
    mask[0] = float("-inf")
    out = []
    for _ in range(length):
        probs = torch.softmax(logits / temperature + mask, -1)
        ids = torch.multinomial(probs, 1)
        out.append(ids)
        logits, state = model(ids, state)
        logits = logits[:, -1]
    return torch.cat(out, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Tutorial()
    result = {"benchmark": "reference", "parameters": sum(q.numel() for q in model.parameters())}
    if not args.skip_train:
        opt = torch.optim.Adam(model.parameters())
        x, y = torch.randint(1, V, (64, 100)), torch.randint(1, V, (64, 100))
        times = []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            logits, _ = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        ms = median_ms(times)
        result.update(train_ms_per_step_median=round(ms, 1), train_chars_per_s=round(6400 / (ms / 1000), 1))
    model.eval()
    one_step_generate(model, 1, 20)
    for batch in (1, 5):
        t = time.perf_counter()
        one_step_generate(model, batch, args.length)
        result[f"generate_b{batch}_chars_per_s"] = round(batch * args.length / (time.perf_counter() - t), 1)
    result.update(peak_rss_mb=round(peak_rss_mb(), 1), **machine())
    emit(result)


if __name__ == "__main__":
    main()
