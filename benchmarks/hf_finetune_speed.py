"""Fine-tuning a GPT-2-class model with charrnn against transformers' own Trainer, in one sitting.

    python benchmarks/hf_finetune_speed.py --corpus FILE [--models tiny 20m] [--modes full lora] [--steps 40]

Both sides train the same model (built here with random weights and a byte-level BPE tokenizer learned from FILE:
``tiny``, the tests' GPT-2 of 2 layers x 32; ``20m``, 5 layers x 512, vocabulary 8,192, about 20M parameters) on
the same text, with the same batch (8 windows of --seq-len tokens), AdamW at a constant learning rate, gradient
clipping at 1.0, fp32 (``--precision`` bf16: both in bf16 autocast), and for ``lora`` the same peft settings (rank
8, alpha 8, no dropout, every linear layer but the output).  Each run is a process of its own; it reports the
tokens per second of its median step after the first --warmup (a step that ends an epoch, where charrnn also
validates and checkpoints, is not the median), its peak resident memory (charrnn's includes its validation and
checkpoint at the end; the Trainer here saves nothing), and that peak less the memory after the model was loaded.
The sides alternate, --repeats times; prints one JSON object with every run and the medians.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, peak_rss_mb  # noqa: E402

SIZES = {"tiny": dict(layers=2, width=32, heads=2, vocab=300, context=128),
         "20m": dict(layers=5, width=512, heads=8, vocab=8192, context=256)}
LORA = dict(r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
LR = 1e-4


def build(folder: Path, text: str, size: str) -> None:
    """A GPT-2 of ``size`` with random weights (no dropout) and a BPE tokenizer learned from ``text``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    s = SIZES[size]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=s["vocab"], special_tokens=["<|endoftext|>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=s["context"], n_embd=s["width"], n_layer=s["layers"],
                        n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class Clock:
    """The time of each step after the first ``warmup``, from the end of one to the end of the next."""

    def __init__(self, warmup: int):
        self.warmup, self.steps, self.last, self.durations = warmup, 0, None, []

    def step(self) -> None:
        now = time.perf_counter()
        self.peak_mb = peak_rss_mb()        # while training, before the end's validation and checkpoint
        self.steps += 1
        if self.steps > self.warmup:
            self.durations.append(now - self.last)
        self.last = now

    def median(self) -> float:
        return statistics.median(self.durations)


def run_charrnn(args, model: str, lora: bool, out: str, clock: Clock) -> None:
    import charrnn

    charrnn.train(args.corpus, out, init_from=model, lora=LORA["r"] if lora else None, max_steps=args.steps,
                  seq_len=args.seq_len, batch_size=8, optimizer="adamw", lr=LR, clip=1.0, precision=args.precision,
                  val_fraction=0.1, eval_every=10**9, sample_every=0, progress=False, log=lambda m: None,
                  hooks={"after_step": lambda t, info: clock.step()})


def run_trainer(args, model: str, lora: bool, out: str, clock: Clock) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = Path(args.corpus).read_text(encoding="utf-8")
    ids = np.asarray(tokenizer(text[: int(len(text) * 0.9)])["input_ids"], dtype=np.int64)
    n = len(ids) // args.seq_len
    windows = torch.from_numpy(ids[: n * args.seq_len].reshape(n, args.seq_len))
    data = [{"input_ids": w, "labels": w} for w in windows]
    net = AutoModelForCausalLM.from_pretrained(model)
    if lora:
        import peft

        net = peft.get_peft_model(net, peft.LoraConfig(**LORA))

    class Timing(TrainerCallback):
        def on_step_end(self, *a, **kw):
            clock.step()

    targs = TrainingArguments(out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=LR,
                              lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
                              bf16=args.precision == "bf16", use_cpu=True, save_strategy="no", eval_strategy="no",
                              logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                              seed=0)
    Trainer(model=net, args=targs, train_dataset=data, callbacks=[Timing()]).train()


def child(args) -> None:
    """One run, in this process: prints its figures as JSON."""
    import torch

    import charrnn.hf  # noqa: F401 - the imports' memory is in the baseline on both sides
    import peft  # noqa: F401
    import transformers  # noqa: F401

    model = os.path.join(args.workdir, args.model)
    base = peak_rss_mb()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model)     # the loaded model's memory is in the baseline too
    loaded = peak_rss_mb()
    gc.collect()            # that copy freed now, not whenever a side's own allocations trigger a collection
    clock = Clock(args.warmup)
    with tempfile.TemporaryDirectory() as out:
        (run_charrnn if args.side == "charrnn" else run_trainer)(args, model, args.mode == "lora", out, clock)
    print(json.dumps({"side": args.side, "model": args.model, "mode": args.mode,
                      "tokens_per_s": round(8 * args.seq_len / clock.median(), 1),
                      "peak_rss_mb": round(peak_rss_mb(), 1), "peak_over_loaded_mb": round(peak_rss_mb() - loaded, 1),
                      "training_peak_rss_mb": round(clock.peak_mb, 1),
                      "imports_mb": round(base, 1), "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--models", nargs="+", default=["tiny", "20m"], choices=list(SIZES))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    text = Path(args.corpus).read_text(encoding="utf-8")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for size in args.models:
            build(Path(work) / size, text, size)
        for size in args.models:
            for mode in args.modes:
                for _ in range(args.repeats):
                    for side in ("charrnn", "trainer"):
                        cmd = [sys.executable, __file__, "--child", "--side", side, "--model", size, "--mode", mode,
                               "--workdir", work, "--corpus", args.corpus, "--steps", str(args.steps), "--warmup",
                               str(args.warmup), "--seq-len", str(args.seq_len), "--precision", args.precision]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                        runs.append(json.loads(out.strip().splitlines()[-1]))
    medians = []
    for size in args.models:
        for mode in args.modes:
            row = {"model": size, "mode": mode}
            for side in ("charrnn", "trainer"):
                mine = [r for r in runs if (r["side"], r["model"], r["mode"]) == (side, size, mode)]
                for key in ("tokens_per_s", "peak_rss_mb", "peak_over_loaded_mb", "training_peak_rss_mb"):
                    row[f"{side}_{key}"] = statistics.median(r[key] for r in mine)
            row["speed_ratio"] = round(row["charrnn_tokens_per_s"] / row["trainer_tokens_per_s"], 3)
            medians.append(row)
    emit({"benchmark": "hf_finetune_speed", "corpus": args.corpus, "steps": args.steps, "warmup": args.warmup,
          "batch": 8, "seq_len": args.seq_len, "precision": args.precision, "lora": LORA, "lr": LR,
          "medians": medians, "runs": runs, "machine": machine()})


if __name__ == "__main__":
    main()
