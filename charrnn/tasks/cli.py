"""``charrnn task reber|dates ...``: parsing and printing only; the work is in the task modules."""

from __future__ import annotations

import json
import sys


# charrnn.models.seq2seq.KINDS, spelled out so that building the parser needs no torch
# (tests/test_export.py checks that the two agree).
DATE_MODELS = ("basic", "teacher-forcing", "attention")


def _train_common(p, defaults: dict) -> None:
    p.add_argument("--out", required=True, help="run directory to write (never overwritten without --force)")
    p.add_argument("--force", action="store_true", help="replace an existing run in --out")
    p.add_argument("--train-size", type=int, default=defaults["train_size"],
                   help="training examples (default %(default)s)")
    p.add_argument("--val-size", type=int, default=defaults["val_size"],
                   help="validation examples checked after every epoch (default %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="default %(default)s")
    p.add_argument("--lr", type=float, default=defaults["lr"], help="Adam learning rate, cosine-decayed over the "
                                                                    "epochs (default %(default)s)")
    p.add_argument("--embed", type=int, default=defaults["embed"], help="embedding size (default %(default)s)")
    p.add_argument("--hidden", type=int, default=defaults["hidden"], help="GRU units (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--time-limit", type=float, help="stop training after this many seconds")
    p.add_argument("--json", action="store_true", help="print the run's config and results as JSON")


def add_task_parser(sub) -> None:
    """Register ``task`` on the main parser's sub-parsers (without importing torch: the task
    modules are imported by the commands that use them)."""
    task = sub.add_parser("task", help="sequence tasks: embedded Reber grammar classifier, date conversion")
    tasks = task.add_subparsers(dest="task", required=True, parser_class=type(task))

    # -- reber ---------------------------------------------------------------------------
    r = tasks.add_parser("reber", help="classify strings of the embedded Reber grammar (GRU, variable lengths)")
    rs = r.add_subparsers(dest="action", required=True, parser_class=type(task))
    p = rs.add_parser("train", help="train on strings, half grammatical and half with one character replaced")
    _train_common(p, dict(train_size=10_000, val_size=2_000, epochs=20, batch_size=32, lr=0.005, embed=5, hidden=32))
    p.set_defaults(func=cmd_reber_train)
    p = rs.add_parser("eval", help="accuracy on freshly generated strings and the two tricky strings")
    p.add_argument("run")
    p.add_argument("--size", type=int, default=2000, help="strings to generate (default %(default)s)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the fresh strings (default %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reber_eval)
    p = rs.add_parser("predict", help="probability that each string is grammatical")
    p.add_argument("run")
    p.add_argument("strings", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reber_predict)

    # -- dates ---------------------------------------------------------------------------
    d = tasks.add_parser("dates", help='convert dates like "September 20, 7075" to "7075-09-20" (encoder-decoder)')
    ds = d.add_subparsers(dest="action", required=True, parser_class=type(task))
    p = ds.add_parser("train", help="train an encoder-decoder on random dates")
    p.add_argument("--model", choices=DATE_MODELS, default="attention",
                   help="basic: encoder state repeated at every output step; teacher-forcing: decoder fed the "
                        "previous output character; attention: teacher forcing + Luong attention (default)")
    _train_common(p, dict(train_size=20_000, val_size=1_000, epochs=20, batch_size=64, lr=0.003, embed=32,
                          hidden=128))
    p.set_defaults(func=cmd_dates_train)
    p = ds.add_parser("eval", help="exact-match accuracy on fresh dates")
    p.add_argument("run")
    p.add_argument("--size", type=int, default=10_000, help="dates to generate (default %(default)s)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the fresh dates (default %(default)s)")
    p.add_argument("--beam-width", type=int, help="also decode with beam search of this width and compare")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dates_eval)
    p = ds.add_parser("convert", help="convert dates, one per line")
    p.add_argument("run")
    p.add_argument("dates", nargs="+")
    p.add_argument("--beam-width", type=int, help="print the K best conversions of each date with their "
                                                  "log-probabilities")
    p.add_argument("--plot-attention", metavar="FILE.png",
                   help="draw the attention weights of the first date's conversion (needs matplotlib)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dates_convert)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train_kwargs(args) -> dict:
    return dict(train_size=args.train_size, val_size=args.val_size, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, embed=args.embed, hidden=args.hidden, seed=args.seed, time_limit=args.time_limit,
                force=args.force, log=_log)


def cmd_reber_train(args) -> int:
    from . import reber

    cfg = reber.train(args.out, **_train_kwargs(args))
    res = cfg["result"]
    if args.json:
        print(json.dumps(cfg))
    else:
        print(f"trained in {res['train_time']:.1f} s ({res['cpu_time']:.1f} s CPU), {res['epochs']} epochs; "
              f"validation accuracy {res['val_accuracy']:.4f}; run in {args.out}")
        for s, p in res["tricky"].items():
            print(f"  {s}  P(grammatical) = {p:.4f}")
    return 0


def cmd_reber_eval(args) -> int:
    from . import reber

    r = reber.evaluate(args.run, args.size, args.seed)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"accuracy {r['accuracy']:.4f} ({r['correct']}/{r['strings']} fresh strings, seed {r['seed']})")
    for s, t in r["tricky"].items():
        verdict = "right" if t["correct"] else "WRONG"
        print(f"  {s}  P(grammatical) = {t['probability']:.4f}  (is {'' if t['grammatical'] else 'not '}"
              f"grammatical: {verdict})")
    return 0


def cmd_reber_predict(args) -> int:
    from . import reber

    model, voc, _ = reber.load(args.run)
    probs = reber.predict_proba(model, voc, args.strings)
    if args.json:
        print(json.dumps(dict(zip(args.strings, probs))))
    else:
        for s, p in zip(args.strings, probs):
            print(f"{p:.4f}\t{s}")
    return 0


def cmd_dates_train(args) -> int:
    from . import dates

    cfg = dates.train(args.out, model=args.model, **_train_kwargs(args))
    res = cfg["result"]
    if args.json:
        print(json.dumps(cfg))
    else:
        print(f"{args.model}: trained in {res['train_time']:.1f} s ({res['cpu_time']:.1f} s CPU), {res['epochs']} "
              f"epochs, {res['parameters']:,} parameters; validation accuracy {res['val_accuracy']:.4f}; "
              f"run in {args.out}")
    return 0


def cmd_dates_eval(args) -> int:
    from . import dates

    r = dates.evaluate(args.run, args.size, args.seed, args.beam_width)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']}: greedy exact-match accuracy {r['greedy_accuracy']:.4f} on {r['dates']} fresh dates "
          f"(seed {r['seed']}, {r['greedy_seconds']} s)")
    if args.beam_width:
        print(f"beam width {r['beam_width']}: accuracy {r['beam_accuracy']:.4f} ({r['beam_seconds']} s); best beam "
              f"log-probability below greedy's on {r['beam_worse_than_greedy']} dates, above on "
              f"{r['beam_better_than_greedy']} (plain beam search, without the greedy output merged in: "
              f"accuracy {r['plain_beam_accuracy']:.4f}, below greedy on {r['plain_beam_worse_than_greedy']})")
    for i, p, t in r["errors"]:
        print(f"  error: {i!r} -> {p!r}, expected {t!r}")
    return 0


def cmd_dates_convert(args) -> int:
    from ..options import check_beam_width
    from . import dates

    if args.beam_width is not None:
        check_beam_width(args.beam_width)
    conv, _ = dates.load(args.run)
    if args.plot_attention:
        out = dates.plot_attention(conv, args.dates[0], args.plot_attention)
        _log(f"attention weights of {args.dates[0]!r} -> {out!r} drawn in {args.plot_attention}")
    if args.beam_width:
        results = conv.beam(args.dates, args.beam_width)
        if args.json:
            print(json.dumps({d: [{"output": o, "log_prob": lp} for o, lp in r] for d, r in zip(args.dates, results)}))
        else:
            for i, (d, r) in enumerate(zip(args.dates, results)):
                if i:
                    print()
                for o, lp in r:
                    print(f"{o}\t{lp:.4f}\t{d}")
    else:
        results = conv.greedy(args.dates)
        if args.json:
            print(json.dumps({d: o for d, (o, _) in zip(args.dates, results)}))
        else:
            for o, _ in results:
                print(o)
    return 0
