"""``charrnn``: the command line.  Parsing and printing only; the work is in the library.

Every user error is one line on stderr, ``error: <what and how to fix>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .config import PRESET_HELP, PRESETS, TrainConfig, default_of, option_fields, option_names, value_type
from .errors import CharRNNError, OptionError, flag
from .options import DynamicOptions, GenerationOptions

RULE = "-" * 72
MODEL_HELP = ("run directory written by `charrnn train`, or a Hugging Face causal language model: a directory "
              "written by save_pretrained, or a hub id such as gpt2 (needs the hf extra)")


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
    add_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)


def _help(f) -> str:
    """The field's help with its default: the text written beside it, or the value itself (None and False
    say nothing)."""
    text, shown = f.metadata["help"], f.metadata.get("default_text")
    if shown is not None:
        return f"{text} (default: {shown})"
    default = default_of(f)
    if default is None or default is False:
        return text
    if isinstance(default, list):
        default = ",".join(map(str, default))
    elif isinstance(default, float):
        default = f"{default:g}"
    return f"{text} (default {default})"


def _parse(fn):
    """``fn`` for argparse: its ValueError becomes the one-line usage error."""
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def add_options(parser, cls) -> list[str]:
    """A flag for every option field of the dataclass ``cls`` (nested ones included), in argument groups
    named by the fields' ``group``; each defaults to None ("not given"). The fields' names."""
    groups, names = {}, []
    for owner, f, group in option_fields(cls):
        if group not in groups:
            groups[group] = parser.add_argument_group(group) if group else parser
        kind, _ = value_type(owner, f)
        meta, kw = f.metadata, {}
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = _parse(meta["parse"]) if "parse" in meta else kind
            kw.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
        groups[group].add_argument(flag(f.name), default=None, help=_help(f), **kw)
        names.append(f.name)
    return names


def _trains_own_model(args) -> bool:
    """Whether the run trains one of charrnn's own models, not a Hugging Face model it fine-tunes (a transformer
    trains about a third slower with the allocation settings of :func:`charrnn.hardware.tune_cpu_allocator`)."""
    from . import checkpoint as ckpt
    from .api import is_pretrained_source

    if args.resume:
        return not ckpt.is_hf_run(args.out)
    return args.init_from is None or not is_pretrained_source(args.init_from)


def cmd_train(args) -> int:
    from .api import train
    from .hardware import tune_cpu_allocator

    if _trains_own_model(args):
        tune_cpu_allocator()     # this process is ours: the allocation settings a recurrent model trains best with
    options = {name: getattr(args, name) for name in option_names(TrainConfig)}
    result = train(args.corpus, args.out, preset=args.preset, resume=args.resume, force=args.force,
                   progress=not args.quiet, **options)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 130 if result.stop_reason == "interrupted" else 0
    unit = "char" if result.tokenizer == "char" else "token"
    best = f"{result.best_val_loss:.4f} nats/{unit}" if result.best_val_loss is not None else "n/a"
    print(f"stopped ({result.stop_reason}) at step {result.step}, epoch {result.epoch}, after "
          f"{result.train_time:.0f} s; best val loss {best}; run in {result.run_dir}", file=sys.stderr)
    if result.stop_reason == "interrupted":
        launcher = "torchrun ... -m charrnn" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "charrnn"
        print(f"checkpoint saved; continue with: {launcher} train {args.corpus} --out {args.out} --resume",
              file=sys.stderr)
        return 130
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run, an exported .onnx file or a Hugging Face "
                                        "model")
    p.add_argument("run", metavar="MODEL", help=MODEL_HELP + "; or an .onnx file written by `charrnn export` "
                                                             "(generated with onnxruntime, without torch)")
    add_options(p, GenerationOptions)
    p.add_argument("--json", action="store_true", help='print {"samples": [...], "finish_reasons": [...]}')
    g = p.add_argument_group("run directories and Hugging Face models only (not .onnx files)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a sample before this text (which is not printed); repeat for several")
    g.add_argument("--logprobs", type=int, metavar="N", help='with --json: each generated token\'s log-probability '
                                                            'and its N likeliest alternatives ("logprobs")')
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default cpu")
    g.add_argument("--beam-width", type=int, help="print the K most likely continuations (beam search) with their "
                                                  "total log-probabilities instead of sampling")
    g = p.add_argument_group("run directories only")
    g.add_argument("--adapt", metavar="FILE", help="first adapt (a copy of) the model to this UTF-8 text by dynamic "
                                                   "evaluation, e.g. a sample of the style to continue in")
    add_options(g, DynamicOptions)
    g.add_argument("--weights", choices=["best", "latest"], help="default best")
    g.add_argument("--int8", action="store_true",
                   help="run each sampling step with int8 weights (CPU): faster, especially at small batches, "
                        "at nearly fp32's quality (docs/performance.md has the figures)")
    p.set_defaults(func=cmd_generate)


def _warn_unknown(lm, text: str) -> None:
    unknown = lm.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        print(f"warning: prompt characters not in the model's vocabulary are read as [UNK]: {shown}",
              file=sys.stderr)


def _print_json(obj) -> None:
    """``obj`` as a line of JSON, which is UTF-8: the bytes of a prompt that were not (kept as lone surrogates)
    become U+FFFD."""
    from .tokens import UNDECODABLE

    print(UNDECODABLE.sub("\ufffd", json.dumps(obj, ensure_ascii=False)))


def _is_exported(path: str) -> bool:
    return path.lower().endswith(".onnx")


def _generator(args, o: GenerationOptions):
    """The model to generate from and its sampling parameters (an .onnx file brings its own defaults), checked."""
    from .options import SamplingParams, check_beam_width

    s = o.sampling
    decoding_only = [name for name, given in (
        ("--repetition-penalty", s.repetition_penalty != 1), ("--presence-penalty", s.presence_penalty != 0),
        ("--frequency-penalty", s.frequency_penalty != 0), ("--stop", args.stop),
        ("--logprobs", args.logprobs is not None)) if given]
    if args.logprobs is not None and not (args.json and 0 <= args.logprobs <= 20):
        raise OptionError("logprobs", "is the number of alternatives per token (0 to 20) and goes with --json, got "
                                      "{value}", value=args.logprobs)
    # The SamplingParams, checked before a model is loaded (and adapted).
    options = SamplingParams.of(s, stop=tuple(args.stop or ()), logprobs=args.logprobs)
    dynamic = _dynamic_options(args)          # checked even when --adapt is left out
    if not _is_exported(args.run):
        from .api import load

        if args.beam_width is not None:
            check_beam_width(args.beam_width)
            if decoding_only:
                raise CharRNNError(f"{decoding_only[0]} applies to sampling and greedy decoding, not to --beam-width; "
                                   "drop one of them")
        from .corpus import read_text_file

        style = read_text_file(args.adapt, "--adapt") if args.adapt is not None else None
        lm = load(args.run, weights=args.weights or "best", device=args.device or "cpu", int8=args.int8)
        if style is not None:
            if not lm.capabilities.dynamic:
                raise CharRNNError("--adapt applies to charrnn runs; drop it for a Hugging Face model")
            lm = lm.adapted(style, dynamic, progress=True, what=f"--adapt {args.adapt}")
        return lm, options
    # An exported file: onnxruntime and NumPy only (this path never imports torch).
    from .runtime import load as load_exported

    run_only = [name for name, value in (("--weights", args.weights), ("--device", args.device),
                                         ("--int8", args.int8), ("--beam-width", args.beam_width),
                                         ("--adapt", args.adapt)) if value]
    run_only += [name for name in decoding_only if name != "--repetition-penalty"]
    if run_only:
        one = len(run_only) == 1
        raise CharRNNError(f"{', '.join(run_only)} {'applies' if one else 'apply'} only to run directories, not to an "
                           "exported .onnx file (for int8 weights, export with `charrnn export RUN --int8`); "
                           f"drop {'it' if one else 'them'} or give the run directory")
    lm = load_exported(args.run)
    # The flags left out (None) take the file's defaults.
    return lm, lm.sampling_params(**{name: getattr(args, name) for name in option_names(SamplingParams)})


def cmd_generate(args) -> int:
    # Options left out take GenerationOptions' defaults (the temperature: an .onnx file's, see _generator).
    o = GenerationOptions.from_dict({name: getattr(args, name) for name in option_names(GenerationOptions)
                                     if getattr(args, name) is not None})
    lm, params = _generator(args, o)
    _warn_unknown(lm, o.prompt)
    if args.beam_width is not None:
        beams = lm.sampler.beam(o.prompt, o.length, args.beam_width, label=o.sampling.label)
        if args.json:
            _print_json({"beams": [{"text": t, "log_prob": lp} for t, lp in beams]})
        else:
            print(f"\n\n{RULE}\n\n".join(f"[log-probability {lp:.4f}]\n{t}" for t, lp in beams))
        return 0
    if args.json and not lm.capabilities.complete:      # no stop texts: every sample runs to its length
        samples = lm.generate(o.prompt, o.length, num_samples=o.num_samples, params=params)
        _print_json({"samples": samples, "finish_reasons": ["length"] * len(samples)})
    elif args.json:
        done = lm.complete(o.prompt, o.length, num_samples=o.num_samples, params=params)
        out = {"samples": [c.text for c in done], "finish_reasons": [c.finish_reason for c in done]}
        if args.logprobs is not None:
            out["logprobs"] = [c.logprobs for c in done]
        _print_json(out)
    elif o.num_samples == 1:
        out = sys.stdout
        out.write(o.prompt)
        out.flush()
        for (text,) in lm.stream(o.prompt, o.length, params=params):
            out.write(text)
            out.flush()
        out.write("\n")
    else:
        samples = lm.generate(o.prompt, o.length, num_samples=o.num_samples, params=params)
        print(f"\n\n{RULE}\n\n".join(samples))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run to a file that generates without torch, or to a web page",
                       description="--format onnx: the run's one-step model (character ids and recurrent state in, "
                                   "logits and the new state out) as ONNX, with the vocabulary and sampling defaults "
                                   "as metadata; `charrnn generate FILE.onnx` (or charrnn.runtime) generates from it "
                                   "with onnxruntime and NumPy alone. --format web: a folder with a page that "
                                   "generates in the browser (no server, no Python; open index.html or publish the "
                                   "folder on any static host) and charrnn.js for your own pages.")
    p.add_argument("run", help="run directory written by `charrnn train`, or a shipped model (base-en)")
    p.add_argument("--format", choices=["onnx", "web"], default="onnx", help="default %(default)s")
    p.add_argument("--out", required=True, help="onnx: a file ending in .onnx; web: a new or empty folder "
                                                "(never overwritten without --force)")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default %(default)s")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true",
                           help="store the matrix weights as int8, a smaller file at nearly fp32's quality: for onnx "
                                "onnxruntime's dynamic quantisation (int8 arithmetic; docs/performance.md), for web "
                                "weight-only (fp32 arithmetic in the page; docs/web.md). The default for --format web "
                                "where it costs at most 0.001 bits/char on the run's validation split")
    precision.add_argument("--fp32", action="store_true", help="keep fp32 weights (the default for --format onnx)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file, or an exported page")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.format == "web":
        from .web_export import export_web

        precision = "int8" if args.int8 else "fp32" if args.fp32 else "auto"
        r = export_web(args.run, args.out, weights=args.weights, precision=precision, force=args.force)
        print(f"exported {args.run} ({r.weights_file}) to the folder {r.path} ({r.bytes / 1e6:.1f} MB) in "
              f"{r.seconds:.1f} s; weights {r.note}.\nOpen {r.path / 'index.html'} in a browser, or publish the "
              "folder on any static host (e.g. GitHub Pages).", file=sys.stderr)
        return 0
    from .export import export_onnx

    r = export_onnx(args.run, args.out, weights=args.weights, int8=args.int8, force=args.force)
    print(f"exported {args.run} ({r.weights_file}, {r.weights}) to {r.path} ({r.bytes / 1e6:.1f} MB) in "
          f"{r.seconds:.1f} s; generate with: charrnn generate {r.path} --prompt TEXT", file=sys.stderr)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, bits/char and perplexity of a model on a run's validation split or a corpus")
    p.add_argument("run", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--corpus", help="evaluate on all of this corpus instead of the run's validation split")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="with --corpus: only its last F, the validation split a run trained with --val-fraction F "
                        "holds out (the same text for every model)")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default %(default)s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default %(default)s")
    p.add_argument("--label", metavar="NAME", help="of a run trained with --labels: that label's validation text "
                                                   "only (default: every label's, one row each), or --corpus read "
                                                   "under it (default: unlabelled)")
    p.add_argument("--json", action="store_true",
                   help='print {"loss", "perplexity"} per token, {"bpc", "nats_per_char"} per character, {"tokens", '
                        '"chars"} scored, and {"unk_tokens", "unk_chars", "unk_share"}: the [UNK] tokens (words '
                        'outside a word vocabulary), which are not scored')
    p.add_argument("--dynamic", action="store_true",
                   help="also read the text with dynamic evaluation (the model adapts as it reads; charrnn runs): "
                        "both losses are printed")
    add_options(p, DynamicOptions)
    g = p.add_argument_group("Hugging Face models only")
    g.add_argument("--window", type=int, metavar="N", help="tokens the model reads at once (default: its context)")
    g.add_argument("--stride", type=int, metavar="N", help="tokens between the starts of two windows; each token is "
                                                           "scored once, with at least N - stride tokens before it "
                                                           "(default: half a window)")
    p.set_defaults(func=cmd_eval)


def _dynamic_options(args):
    return DynamicOptions(**{name: getattr(args, name) for name in option_names(DynamicOptions)
                             if getattr(args, name) is not None}).validate()


def cmd_eval(args) -> int:
    from .api import load
    from .evaluation import unscored_note

    if args.val_fraction is not None and (args.corpus is None or not 0 < args.val_fraction < 1):
        raise OptionError("val_fraction", "must be in (0, 1) and goes with --corpus, got {value}",
                          value=args.val_fraction)
    dynamic = _dynamic_options(args)          # checked even when --dynamic is left out
    windows = {k: getattr(args, k) for k in ("window", "stride") if getattr(args, k) is not None}
    for name, value in windows.items():
        if value < 1:
            raise OptionError(name, "must be a positive number of tokens, got {value}", value=value)
    lm = load(args.run, weights=args.weights, device=args.device)
    if windows and not lm.capabilities.windows:
        raise CharRNNError(f"--{next(iter(windows))} applies to Hugging Face models; a recurrent run reads the whole "
                           "text with its state carried: drop it")
    if args.dynamic:
        if not lm.capabilities.dynamic:
            raise CharRNNError("--dynamic applies to charrnn runs; drop it for a Hugging Face model")
        windows["dynamic"] = dynamic
    if args.label is not None:
        windows["label"] = args.label
    r = lm.evaluate(args.corpus, val_fraction=args.val_fraction, **windows)
    if args.json:
        print(json.dumps(r))
        return 0
    where = args.corpus or "validation split"
    where += f" (last {args.val_fraction:g})" if args.val_fraction else ""
    weights = f"windows of {r['window']} tokens, stride {r['stride']}" if "window" in r else lm.label
    if lm.vocab.kind == "char":
        print(f"{where}: loss {r['loss']:.4f} nats/char, {r['bpc']:.4f} bits/char, perplexity "
              f"{r['perplexity']:.3f} over {r['chars']:,} characters ({weights}){unscored_note(r)}")
    else:
        print(f"{where}: {r['bpc']:.4f} bits/char ({r['nats_per_char']:.4f} nats/char) over {r['chars']:,} "
              f"characters; loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f} over "
              f"{r['tokens']:,} {lm.vocab.kind} tokens ({weights}){unscored_note(r)}")
    for name, lr in r.get("labels", {}).items():
        print(f"  label {name}: {lr['bpc']:.4f} bits/char, loss {lr['loss']:.4f} nats/char over {lr['chars']:,} "
              "characters")
    if args.dynamic:
        d = r["dynamic"]
        print(f"dynamic evaluation (lr {d['dynamic_lr']:g}, decay {d['dynamic_decay']:g}, segments of "
              f"{d['dynamic_segment']}): {d['bpc']:.4f} bits/char ({d['nats_per_char']:.4f} nats/char), against "
              f"{r['bpc']:.4f} static")
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


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the models shipped with charrnn (generate, eval, serve and --init-from "
                                      "take their names)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from .shipped import listing

    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}: {r['description']}")
        print(f"  card: {r['card']}" if r["available"] else "  not in this installation")
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
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default %(default)s")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.run, args.out, force=args.force, weights=args.weights)}", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: a JSON API, streaming, and a web page",
                       description="Serve a trained run or a Hugging Face model over HTTP (needs the serve extra): "
                                   "POST /v1/generate, "
                                   "POST /v1/generate/stream (server-sent events), GET /v1/model, GET /healthz, "
                                   "GET /metrics (Prometheus), and a web page at /.")
    p.add_argument("run", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="default %(default)s; 0 picks a free port")
    p.add_argument("--weights", choices=["best", "latest"], default="best", help="default %(default)s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default %(default)s")
    p.add_argument("--int8", action="store_true", help="generate with int8 weights (CPU); requests are then "
                                                       "stepped one after another instead of batched together")
    from .serve import SHUTDOWN_SECONDS
    from .serve.limits import Limits

    add_options(p, Limits)
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                   help="server log level (info logs every request)")
    g = p.add_argument_group("access and shutdown (see docs/serving.md)")
    g.add_argument("--api-key", metavar="KEY", help="require the header Authorization: Bearer KEY on every /v1/ "
                                                    "request (default: $CHARRNN_API_KEY if set; otherwise none)")
    g.add_argument("--api-key-file", metavar="PATH", help="the key from the first line of PATH (not shown in the "
                                                         "process list, as --api-key is)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://example.com) call the API; repeatable")
    g.add_argument("--shutdown-seconds", type=float, default=SHUTDOWN_SECONDS, metavar="N",
                   help="on SIGTERM or Ctrl-C, seconds requests in flight have to finish before they are ended "
                        "with an error (default %(default)g)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .serve import Limits, serve

    limits = Limits(**{name: getattr(args, name) for name in option_names(Limits) if getattr(args, name) is not None})
    try:
        serve(args.run, host=args.host, port=args.port, weights=args.weights, device=args.device, int8=args.int8,
              limits=limits, log_level=args.log_level, api_key=args.api_key, api_key_file=args.api_key_file,
              cors_origins=args.cors_origin, shutdown_seconds=args.shutdown_seconds)
    except KeyboardInterrupt:
        pass
    print("server stopped", file=sys.stderr)
    return 0


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="compile charrnn's C++ kernels now (otherwise the first train/generate does it)",
                       description="Compile charrnn's C++ kernels into the build cache now, with progress, so that "
                                   "the first `charrnn train` or `generate` does not wait for it.")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from . import native

    module = native.build(verbose=False)      # prints a line while it compiles
    if module is None:
        raise CharRNNError(f"the C++ kernels could not be built ({native.error() or 'unknown reason'}); charrnn "
                           "still works, with the pure-PyTorch kernels (install a C++ compiler and ninja for them)")
    print(f"charrnn: C++ kernels ready: {module.__file__}", file=sys.stderr)
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
    _add_models(sub)
    _add_plot(sub)
    _add_report(sub)
    _add_serve(sub)
    _add_build(sub)
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
            print(f"error: {e.render(flag)}", file=sys.stderr)   # options spelled as flags
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


REGENERATE_FLAGS = "python -m charrnn.cli --flags-markdown > docs/flags.md"


def flags_markdown() -> str:
    """docs/flags.md: every subcommand's options with their help, defaults and choices, from the parser."""
    lines = ["# Command-line flags", "",
             f"Every `charrnn` subcommand and its options, generated from the parser by `{REGENERATE_FLAGS}`",
             "(tests/test_options.py fails when this file is out of date). `charrnn COMMAND --help` prints the same.",
             ""]
    for path, help_text, parser in _commands(build_parser()):
        lines += [f"## `charrnn {path}`", "", help_text or "", ""]
        if parser.description:
            lines += [parser.description, ""]
        for group in parser._action_groups:
            rows = [_flag_row(a) for a in group._group_actions
                    if a.help != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction,
                                                                         argparse._SubParsersAction))]
            if rows:
                lines += [f"**{group.title}**", "", "| option | choices | description |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


def _commands(parser, prefix: str = ""):
    """``(path, help, parser)`` of every subcommand under ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                yield path, helps.get(name), sub
                yield from _commands(sub, path + " ")


def _flag_row(action) -> str:
    if action.option_strings:
        name = ", ".join(action.option_strings)
        if action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
    else:
        name = action.metavar or action.dest
    choices = ", ".join(map(str, action.choices)) if action.choices else ""
    cells = [f"`{name}`", choices, (action.help or "") % vars(action)]  # as argparse expands %(default)s
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


if __name__ == "__main__":
    if sys.argv[1:] == ["--flags-markdown"]:  # docs/flags.md (see REGENERATE_FLAGS)
        sys.stdout.write(flags_markdown())
        sys.exit(0)
    sys.exit(main())
