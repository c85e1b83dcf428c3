"""``charrnn``: the command line.  Parsing and printing only; the work is in the library.

Every user error is one line on stderr, ``error: <what and how to fix>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .config import PRESET_HELP, PRESETS
from .errors import CharRNNError

RULE = "-" * 72


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line too."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    presets = "; ".join(f"{name}: {PRESET_HELP.get(name, '')}" for name in PRESETS)
    p = sub.add_parser(
        "train", help="train a model on a text file, a folder of .txt files or a named corpus",
        description="Train a character-level language model. Options left out come from --preset, then from "
                    f"the defaults (the TensorFlow tutorial's). Presets: {presets}.",
    )
    p.add_argument("corpus", help="a UTF-8 text file, a directory of .txt files, or a corpus name "
                                  "(shakespeare, nietzsche)")
    p.add_argument("--out", required=True, help="run directory to write (never overwritten without "
                                                "--resume or --force)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named bundle of options (explicit options win)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("corpus")
    g.add_argument("--lowercase", action="store_true", default=None, help="lowercase the text")
    g.add_argument("--newlines-to-spaces", action="store_true", default=None, help="replace newlines by spaces")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["gru", "lstm", "rnn"], help="recurrent cell (default gru)")
    g.add_argument("--layers", type=int, help="stacked recurrent layers (default 1)")
    g.add_argument("--hidden", type=int, help="units per recurrent layer (default 1024)")
    g.add_argument("--embed", type=int, help="embedding size, 0 for one-hot inputs (default 256)")
    g.add_argument("--dropout", type=float, help="dropout between recurrent layers and on the output (default 0)")
    g.add_argument("--weight-drop", type=float,
                   help="DropConnect on the recurrent weights while training, one mask per batch (default 0)")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, help="characters per training sequence (default 100)")
    g.add_argument("--batch-size", type=int, help="sequences per batch (default 64)")
    g.add_argument("--stateful", action="store_true", default=None,
                   help="truncated back-propagation through time: batch-size contiguous streams, each batch "
                        "continuing the last one with the recurrent state carried over (reset every epoch)")
    g.add_argument("--window-step", type=int, help="stateless windows start every N characters (default: "
                                                   "--seq-len, no overlap)")
    g.add_argument("--loss-on", choices=["all", "last"],
                   help="predict every next character of a window (default) or only the one after it (Keras)")
    g.add_argument("--lr", type=float, help="learning rate (default 0.001)")
    g.add_argument("--optimizer", choices=["adam", "adamw", "rmsprop", "sgd"], help="optimizer (default adam)")
    g.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    g.add_argument("--clip", type=float, help="clip the gradient norm to this; 0 turns it off (default 5)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], help="learning-rate schedule (default constant)")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (default 0)")
    g.add_argument("--min-lr-ratio", type=float, help="cosine decays to lr x this (default 0.1)")
    g.add_argument("--epochs", type=int, help="passes over the training text (default 10, unless --max-steps or "
                                              "--time-limit is given)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    g.add_argument("--time-limit", type=float, help="stop after this many seconds of training in all "
                                                     "(checkpoint included)")
    g.add_argument("--val-fraction", type=float, help="the last fraction of the text held out (default 0.1)")
    g.add_argument("--eval-every", type=int, help="also evaluate every N steps (default: each epoch)")
    g.add_argument("--eval-streams", type=int, help="parallel contiguous streams in evaluation (default 16)")
    g.add_argument("--log-every", type=int, help="log the training loss every N steps (default 10)")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: at each "
                                                        "evaluation)")
    g = p.add_argument_group("samples during training (printed and saved in RUN/samples/)")
    g.add_argument("--sample-every", type=int, help="sample every N steps (default: at the end of each epoch "
                                                    "and of training; 0: never)")
    g.add_argument("--sample-temperatures", type=_temperatures, metavar="T1,T2,...",
                   help="one sample per temperature (default 0.2,0.5,1.0,1.2)")
    g.add_argument("--sample-length", type=int, help="characters per sample (default 200)")
    g.add_argument("--sample-prompt", help="text the samples continue (default: the first 40 characters of the "
                                           "validation text)")
    g = p.add_argument_group("reproducibility and hardware")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda if available")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast or fp32; auto picks bf16 where the hardware computes it natively")
    p.set_defaults(func=cmd_train)


def _temperatures(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, like 0.2,0.5,1.0, got '{text}'")


TRAIN_OPTIONS = (
    "lowercase", "newlines_to_spaces", "arch", "layers", "hidden", "embed", "dropout", "weight_drop", "seq_len",
    "batch_size", "stateful", "window_step", "loss_on", "sample_every", "sample_temperatures", "sample_length",
    "sample_prompt", "lr", "optimizer", "weight_decay", "clip", "lr_schedule", "warmup_steps", "min_lr_ratio", "epochs",
    "max_steps", "time_limit", "val_fraction", "eval_every", "eval_streams", "log_every", "checkpoint_every",
    "seed", "device", "precision",
)


def cmd_train(args) -> int:
    from .api import train

    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    result = train(args.corpus, args.out, preset=args.preset, resume=args.resume, force=args.force,
                   progress=not args.quiet, **options)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 130 if result.stop_reason == "interrupted" else 0
    best = f"{result.best_val_loss:.4f} nats/char" if result.best_val_loss is not None else "n/a"
    print(f"stopped ({result.stop_reason}) at step {result.step}, epoch {result.epoch}, after "
          f"{result.train_time:.0f} s; best val loss {best}; run in {result.run_dir}", file=sys.stderr)
    if result.stop_reason == "interrupted":
        launcher = "torchrun ... -m charrnn" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "charrnn"
        print(f"checkpoint saved; continue with: {launcher} train {args.corpus} --out {args.out} --resume",
              file=sys.stderr)
        return 130
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run or an exported .onnx file")
    p.add_argument("run", help="run directory written by `charrnn train`, or an .onnx file written by "
                               "`charrnn export` (generated with onnxruntime, without torch)")
    p.add_argument("--prompt", default="", help="text to continue (default: start after a newline)")
    p.add_argument("--length", type=int, default=1000, help="characters to generate per sample (default 1000)")
    p.add_argument("--temperature", type=float, help="0 is greedy; lower is safer, higher wilder (default 1, or "
                                                     "the default stored in an .onnx file)")
    p.add_argument("--top-k", type=int, help="sample only among the K most likely characters")
    p.add_argument("--top-p", type=float, help="sample only among the most likely characters holding mass P")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated together in one batch")
    p.add_argument("--seed", type=int, help="random seed: same seed, same text")
    p.add_argument("--json", action="store_true", help='print {"samples": [...]}')
    g = p.add_argument_group("run directories only (not .onnx files)")
    g.add_argument("--weights", choices=["best", "latest"], help="default best")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default cpu")
    g.add_argument("--int8", action="store_true",
                   help="run each sampling step with int8 weights (CPU): about 1.8x faster at batch 1, "
                        "validation bits/char within 0.001 of fp32 on Tiny Shakespeare")
    g.add_argument("--beam-width", type=int, help="print the K most likely continuations (beam search) with their "
                                                  "total log-probabilities instead of sampling")
    p.set_defaults(func=cmd_generate)


def _warn_unknown(lm, text: str) -> None:
    unknown = lm.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        print(f"warning: prompt characters not in the model's vocabulary are read as [UNK]: {shown}",
              file=sys.stderr)


def _is_exported(path: str) -> bool:
    return path.lower().endswith(".onnx")


def cmd_generate(args) -> int:
    from .options import check_beam_width, check_sampling_options

    if _is_exported(args.run):
        # An exported file: onnxruntime and NumPy only (this path never imports torch).
        from .runtime import load as load_exported

        given = [flag for flag, value in (("--weights", args.weights), ("--device", args.device),
                                          ("--int8", args.int8), ("--beam-width", args.beam_width)) if value]
        if given:
            one = len(given) == 1
            raise CharRNNError(f"{', '.join(given)} {'applies' if one else 'apply'} only to run directories, not to an "
                               "exported .onnx file (for int8 weights, export with `charrnn export RUN --int8`); "
                               f"drop {'it' if one else 'them'} or give the run directory")
        lm = load_exported(args.run)
        temperature, top_k, top_p = lm.sampling_options(args.temperature, args.top_k, args.top_p)
    else:
        temperature, top_k, top_p = 1.0 if args.temperature is None else args.temperature, args.top_k, args.top_p
        lm = None
    check_sampling_options(temperature, top_k, top_p, args.length, args.num_samples)
    if lm is None:
        from .api import load

        if args.beam_width is not None:
            check_beam_width(args.beam_width)
        lm = load(args.run, weights=args.weights or "best", device=args.device or "cpu", int8=args.int8)
    _warn_unknown(lm, args.prompt)
    if args.beam_width is not None:
        beams = lm.sampler.beam(args.prompt, args.length, args.beam_width)
        if args.json:
            print(json.dumps({"beams": [{"text": t, "log_prob": lp} for t, lp in beams]}, ensure_ascii=False))
        else:
            print(f"\n\n{RULE}\n\n".join(f"[log-probability {lp:.4f}]\n{t}" for t, lp in beams))
        return 0
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=args.seed)
    if args.json:
        samples = lm.generate(args.prompt, args.length, num_samples=args.num_samples, **options)
        print(json.dumps({"samples": samples}, ensure_ascii=False))
    elif args.num_samples == 1:
        out = sys.stdout
        out.write(args.prompt)
        out.flush()
        for (ch,) in lm.stream(args.prompt, args.length, **options):
            out.write(ch)
            out.flush()
        out.write("\n")
    else:
        samples = lm.generate(args.prompt, args.length, num_samples=args.num_samples, **options)
        print(f"\n\n{RULE}\n\n".join(samples))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's one-step generator to a file that generates without torch",
                       description="Write the run's one-step model (character ids and recurrent state in, logits and "
                                   "the new state out) as ONNX, with the vocabulary and sampling defaults as "
                                   "metadata. `charrnn generate FILE.onnx` (or charrnn.runtime) generates from it "
                                   "with onnxruntime and NumPy alone.")
    p.add_argument("run", help="run directory written by `charrnn train`")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default onnx, the only one)")
    p.add_argument("--out", required=True, help="file to write, ending in .onnx (never overwritten without --force)")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default best")
    p.add_argument("--int8", action="store_true",
                   help="store the matrix weights as int8 (onnxruntime dynamic quantisation): 3.4x smaller file, "
                        "validation bits/char unchanged")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_onnx

    r = export_onnx(args.run, args.out, weights=args.weights, int8=args.int8, force=args.force)
    print(f"exported {args.run} ({r.weights_file}, {r.weights}) to {r.path} ({r.bytes / 1e6:.1f} MB) in "
          f"{r.seconds:.1f} s; generate with: charrnn generate {r.path} --prompt TEXT", file=sys.stderr)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, bits/char and perplexity of a run on its validation split or a corpus")
    p.add_argument("run", help="run directory")
    p.add_argument("--corpus", help="evaluate on all of this corpus instead of the run's validation split")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default best")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    p.add_argument("--json", action="store_true", help='print {"loss", "bpc", "perplexity", "chars"}')
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .api import load

    lm = load(args.run, weights=args.weights, device=args.device)
    r = lm.evaluate(args.corpus)
    if args.json:
        print(json.dumps(r))
    else:
        where = args.corpus or "validation split"
        print(f"{where}: loss {r['loss']:.4f} nats/char, {r['bpc']:.4f} bits/char, perplexity "
              f"{r['perplexity']:.3f} over {r['chars']:,} characters ({lm.run.weights})")
    return 0


def _add_corpora(sub) -> None:
    p = sub.add_parser("corpora", help="list the named corpora and where each is available")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_corpora)


def cmd_corpora(args) -> int:
    from .corpus import corpora_status

    rows = corpora_status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}: {r['description']}")
        if r["available"]:
            print(f"  available: {r['path']}")
        else:
            print(f"  not available here; looked in {'; '.join(r['searched'])}; will download {r['url']}")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw training and validation loss of one or more runs into a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (overlaid, with a legend)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from .report import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, force=args.force)}", file=sys.stderr)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML page about a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default best")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.run, args.out, force=args.force, weights=args.weights)}", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained run over HTTP: a JSON API, streaming, and a web page",
                       description="Serve a trained run over HTTP (needs the serve extra): POST /v1/generate, "
                                   "POST /v1/generate/stream (server-sent events), GET /v1/model, GET /healthz, "
                                   "and a web page at /.")
    p.add_argument("run", help="run directory written by `charrnn train`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="default 8000; 0 picks a free port")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default best")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--int8", action="store_true", help="generate with int8 weights (CPU); requests are then "
                                                       "stepped one after another instead of batched together")
    from .serve.limits import LIMIT_HELP

    g = p.add_argument_group("limits (a request over one is refused with a JSON error)")
    for name, (default, text) in LIMIT_HELP.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, metavar="N",
                       help=f"{text} (default {default})")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                   help="server log level (info logs every request)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .serve import Limits, serve
    from .serve.limits import LIMIT_HELP

    limits = Limits(**{name: getattr(args, name) for name in LIMIT_HELP})
    try:
        serve(args.run, host=args.host, port=args.port, weights=args.weights, device=args.device, int8=args.int8,
              limits=limits, log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    print("server stopped", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="charrnn", description="Character-level recurrent language models: train, generate, "
                                                 "evaluate, export.")
    parser.add_argument("--version", action="version", version=f"charrnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_corpora(sub)
    _add_plot(sub)
    _add_report(sub)
    _add_serve(sub)
    from .tasks.cli import add_task_parser

    add_task_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CharRNNError as e:
        if not getattr(e, "from_rank0", False):  # under torchrun, rank 0's errors are printed by rank 0
            print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "safetensors"):
            raise
        # A runtime-only install (numpy + onnxruntime, see README "Export") asked for a PyTorch command.
        print(f"error: this command needs {e.name}, which is not installed; install it (pip install torch==2.13.0 "
              "safetensors), or give an exported .onnx file to `charrnn generate`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
