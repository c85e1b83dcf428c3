"""Where the time goes: torch.profiler tables for a training step and for batch-1 sampling.

    python benchmarks/profile_steps.py [--what train sample] [--rows 12] [--sample-batch 1] [--dtype fp32|bf16]
                                       [--weights fp32|int8] [--backend auto|native|python]

Uses the default model (GRU 1024, embedding 256, vocabulary 66; batch 64 x 100 for training,
200 characters at batch 1, or --sample-batch, for sampling).  Prints the profiler's tables (self CPU time); the
compiled sampling step shows as charrnn::step, charrnn::int8_matvec / int8_matmul and
charrnn::sample, with the ATen calls it makes (sigmoid_, tanh_, softmax, ...) under them.
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample_speed import default_model  # noqa: E402

from charrnn.config import TrainConfig  # noqa: E402
from charrnn.sampling import Sampler  # noqa: E402
from charrnn.training import make_optimizer, train_step  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    p.add_argument("--weights", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--backend", default="auto", choices=["auto", "native", "python"],
                   help="sampling step: compiled (native), pure PyTorch (python), or whichever is available")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="training: fp32 or bf16 autocast")
    p.add_argument("--sample-batch", type=int, default=1, help="samples generated side by side")
    args = p.parse_args(argv)
    model, vocab = default_model()
    device = torch.device("cpu")
    if "train" in args.what:
        opt = make_optimizer(TrainConfig(), model)
        amp = torch.bfloat16 if args.dtype == "bf16" else None
        x, y = torch.randint(1, 66, (64, 100)), torch.randint(1, 66, (64, 100))
        for _ in range(2):
            train_step(model, opt, x, y, 5.0, device, amp)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, opt, x, y, 5.0, device, amp)
        print(f"== training step (batch 64 x 100, {args.dtype})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if "sample" in args.what:
        sampler = Sampler(model.eval(), vocab, weights=args.weights, backend=args.backend)
        n = args.sample_batch
        sampler.generate("ROMEO:", 50, num_samples=n, seed=0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sampler.generate("ROMEO:", 200, num_samples=n, seed=0)
        print(f"== sampling, batch {n}, 200 characters, {args.weights} weights, {sampler.stepper.backend} step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
