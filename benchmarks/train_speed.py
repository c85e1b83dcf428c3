"""Training speed of full steps (forward, loss, backward, clip, optimizer update).

    python benchmarks/train_speed.py [--arch gru --hidden 1024 --embed 256 --layers 1
                                      --batch-size 64 --seq-len 100 --steps 20 --dtype fp32]

Prints one JSON object: chars_per_s (from the median step), ms_per_step_median, peak_rss_mb, ...
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_model_options, emit, machine, median_ms, peak_rss_mb  # noqa: E402

from charrnn.models import CharLM, ModelConfig  # noqa: E402
from charrnn.hardware import resolve_device, resolve_precision, tune_cpu_allocator  # noqa: E402
from charrnn.training import make_optimizer, train_step  # noqa: E402
from charrnn.config import TrainConfig  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--weight-drop", type=float, default=0.0)
    p.add_argument("--vocab", type=int, default=66)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--loss-on", choices=["all", "last"], default="all",
                   help="'last': the Keras recipe's loss on each window's last character")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    amp = resolve_precision(args.dtype, device)
    if device.type == "cpu":
        tune_cpu_allocator()   # as charrnn train does
    torch.manual_seed(0)
    model = CharLM(ModelConfig(args.vocab, args.arch, args.embed, args.hidden, args.layers, args.dropout,
                               args.weight_drop)).to(device)
    opt = make_optimizer(TrainConfig(optimizer=args.optimizer), model)
    params = list(model.parameters())
    x = torch.randint(1, args.vocab, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(1, args.vocab, (args.batch_size, args.seq_len), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = train_step(model, opt, x, y, 5.0, device, amp, params, last_only=args.loss_on == "last")
        float(loss)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    ms = median_ms(times)
    emit({
        "benchmark": "train_speed", "arch": args.arch, "hidden": args.hidden, "embed": args.embed,
        "layers": args.layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "loss_on": args.loss_on, "optimizer": args.optimizer,
        "dtype": "bf16" if amp is not None else "fp32", "device": str(device),
        "parameters": model.num_parameters(), "steps": args.steps,
        "ms_per_step_median": round(ms, 1), "ms_per_step_min": round(min(times) * 1000, 1),
        "chars_per_s": round(args.batch_size * args.seq_len / (ms / 1000), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), **machine(),
    })


if __name__ == "__main__":
    main()
