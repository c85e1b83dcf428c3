"""A character RNN and a transformer on one text and one scale, and the book's exercise 11 call.

    python benchmarks/pretrained_bpc.py --corpus shakespeare --steps 1500

Trains a charrnn GRU for --steps steps, builds the tiny GPT-2 the tests use (random weights, a byte-level
BPE tokenizer trained on the corpus's training split; the hub is not reachable here), and evaluates both
with `charrnn eval MODEL --corpus CORPUS --val-fraction 0.1`: the validation split the run was trained
beside, in bits per character.  Then the exercise's call with the tiny model: five samples of about 40
tokens, temperature 1.0, top-p 0.9, repetition penalty 1.0.  Prints one JSON object per line.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import emit, machine  # noqa: E402

from tests.hf_models import tiny_gpt2  # noqa: E402


def charrnn(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return r.stdout


def evaluate(model, corpus) -> dict:
    r = json.loads(charrnn("eval", model, "--corpus", corpus, "--val-fraction", 0.1, "--json"))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args()
    from charrnn.evaluation import held_out_text

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "gru"
        start = time.perf_counter()
        charrnn("train", args.corpus, "--out", run, "--hidden", 512, "--embed", 128, "--max-steps", args.steps,
                "--sample-every", 0, "--quiet")
        own = json.loads(charrnn("eval", run, "--json"))["bpc"]       # the same text, read by the run's own eval
        emit({"model": f"charrnn GRU 512 (embedding 128), {args.steps} steps", "train_s":
              round(time.perf_counter() - start), "own_validation_bpc": round(own, 4),
              **evaluate(run, args.corpus), "machine": machine()})
        text = held_out_text(args.corpus)
        model = tiny_gpt2(Path(tmp) / "tiny-gpt2", text[: int(len(text) * 0.9)], vocab_size=1000, layers=2, width=64,
                          context=256)
        emit({"model": "tiny GPT-2 (2 layers, width 64, random weights, BPE 1000)", **evaluate(model, args.corpus)})
        samples = json.loads(charrnn("generate", model, "--prompt", "ROMEO:", "--length", 160, "--num-samples", 5,
                                     "--temperature", 1.0, "--top-p", 0.9, "--repetition-penalty", 1.0, "--seed", 42,
                                     "--json"))["samples"]
        emit({"exercise_11": "tiny GPT-2, 5 samples, 160 characters, temperature 1.0, top-p 0.9, repetition "
                             "penalty 1.0, seed 42", "samples": samples})


if __name__ == "__main__":
    main()
