"""A large corpus: encode it once to the on-disk cache, train on it, start again.

    python benchmarks/large_corpus.py [--size-mb 1024] [--source ../shared/data/warpeace.txt]

Builds a text file of --size-mb by repeating --source (kept in a temporary folder), then runs
`charrnn train` on it twice in fresh processes (first: encoding + a few steps of a small model;
second: the cached encoding is memory-mapped), and prints each run's wall time and peak RSS.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def build(path, size, source):
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    block = open(source, "rb").read()
    with open(path + ".part", "wb") as f:
        written = 0
        while written < size:
            f.write(block)
            written += len(block)
    os.replace(path + ".part", path)


def run_train(corpus, out, home, extra):
    code = (
        "import resource, sys, time, json\n"
        "t = time.perf_counter()\n"
        "from charrnn.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    args = [sys.executable, "-c", code, "train", corpus, "--out", out, "--force", "--quiet", *extra]
    env = dict(os.environ, CHARRNN_HOME=home)
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--source", default=os.path.join(HERE, "..", "..", "shared", "data", "warpeace.txt"))
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "charrnn-large"))
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    corpus = os.path.join(args.dir, f"big-{args.size_mb}mb.txt")
    build(corpus, args.size_mb << 20, args.source)
    home = os.path.join(args.dir, "home")
    # A small model and a small validation split: this measures the data path, not the model.
    extra = ["--max-steps", "20", "--hidden", "256", "--embed", "64", "--val-fraction", "0.0001"]
    first = run_train(corpus, os.path.join(args.dir, "run"), home, extra)
    second = run_train(corpus, os.path.join(args.dir, "run"), home, extra)
    small = run_train(os.path.join(HERE, "..", "README.md"), os.path.join(args.dir, "run-small"), home,
                      ["--max-steps", "20", "--hidden", "256", "--embed", "64", "--seq-len", "20", "--batch-size", "8"])
    print(json.dumps({"benchmark": "large_corpus", "size_mb": args.size_mb, "bytes": os.path.getsize(corpus),
                      "first_run": first, "second_run": second, "same_model_on_tiny_text": small,
                      "rss_above_model_mb": round(max(first["peak_rss_mb"], second["peak_rss_mb"])
                                                  - small["peak_rss_mb"], 1)}))


if __name__ == "__main__":
    main()
