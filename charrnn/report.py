"""Pictures of runs: loss curves (``charrnn plot``) and a one-page HTML report (``charrnn report``).

Both read only the run directory (``metrics.jsonl``, ``config.json``, ``samples/``, the
weights), so they work on a run that is still training, from another shell.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from pathlib import Path

from . import checkpoint as ckpt
from .errors import CharRNNError
from .fileio import atomic_write_bytes, atomic_write_text

LN2 = math.log(2)
SAMPLE_NAME = re.compile(r"step(\d+)-t(\d+(?:\.\d*)?)\.txt$")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharRNNError("drawing needs matplotlib; install it with `pip install 'charrnn[plot]'` "
                           "(or `pip install matplotlib`)") from None
    return plt


def _check_out(out, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise CharRNNError(f"{out} already exists; choose another --out or add --force to replace it")
    if out.is_dir():
        raise CharRNNError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise CharRNNError(f"the folder of --out {out} does not exist; create it first")
    return out


def read_metrics(run) -> dict[str, list[dict]]:
    """The run's logged records, by kind: ``train`` (loss), ``val`` (val_loss), ``epoch`` (epoch_loss)."""
    ckpt.read_config(run)
    out: dict[str, list[dict]] = {"train": [], "val": [], "epoch": []}
    for r in ckpt.read_metrics(run):
        for kind, key in (("train", "loss"), ("val", "val_loss"), ("epoch", "epoch_loss")):
            if key in r:
                out[kind].append(r)
    return out


def _labels(runs: list[Path]) -> list[str]:
    names = [r.resolve().name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def bits_per_char(record: dict, prefix: str) -> float:
    """A metrics record's loss in bits per character: ``bpc``/``val_bpc``, or the loss per character of
    a run written before they were logged (a character run: a token is a character)."""
    return record.get(prefix + "bpc", record[prefix + "loss"] / LN2)


def _draw_curves(runs: list[Path], labels: list[str]):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, (run, label) in enumerate(zip(runs, labels)):
        m = read_metrics(run)
        colour = colours[i % len(colours)]
        for ax, x in zip(axes, ("step", "time")):
            scale = 60.0 if x == "time" else 1.0
            if m["train"]:
                ax.plot([r[x] / scale for r in m["train"]], [bits_per_char(r, "") for r in m["train"]], color=colour,
                        alpha=0.45, linewidth=1, label=f"{label} train")
            if m["val"]:
                ax.plot([r[x] / scale for r in m["val"]], [bits_per_char(r, "val_") for r in m["val"]], color=colour,
                        marker="o", markersize=4, linewidth=1.8, label=f"{label} validation")
            _draw_labels(ax, [r for r in m["val"] if "val_labels" in r], x, scale, label)
        drawn = drawn or bool(m["train"] or m["val"])
    if not drawn:
        plt.close(fig)
        raise CharRNNError("no losses logged yet in " + ", ".join(map(str, runs)) + "; train for a few steps first")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall-clock training time (minutes)")
    axes[0].set_ylabel("loss (bits per character)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle("training (thin) and validation (dots) loss")
    fig.tight_layout()
    return fig, plt


def _draw_labels(ax, records: list[dict], x: str, scale: float, run_label: str) -> None:
    """A labelled run's validation curve of every label (dashed; :mod:`charrnn.labels`)."""
    for name in records[0]["val_labels"] if records else []:
        ax.plot([r[x] / scale for r in records], [r["val_labels"].get(name, math.nan) for r in records],
                linestyle="--", marker=".", linewidth=1, label=f"{run_label} validation, {name}")


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_runs(runs, out, force: bool = False) -> Path:
    """Draw training and validation loss (bits/char) against steps and against time, runs overlaid."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise CharRNNError("give at least one run directory to plot")
    out = _check_out(out, force)
    fig, plt = _draw_curves(runs, _labels(runs))
    atomic_write_bytes(out, _png(fig, plt))
    return out


def latest_samples(run) -> tuple[int | None, list[tuple[float, str]]]:
    """The samples of the last step that has any: ``(step, [(temperature, text), ...])``."""
    folder = Path(run) / ckpt.SAMPLES
    by_step: dict[int, list[tuple[float, str]]] = {}
    for path in folder.glob("step*-t*.txt") if folder.is_dir() else []:
        m = SAMPLE_NAME.search(path.name)
        if m and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")   # shown, never parsed
            by_step.setdefault(int(m.group(1)), []).append((float(m.group(2)), text))
    if not by_step:
        return None, []
    step = max(by_step)
    return step, sorted(by_step[step])


def generation_speed(lm, length: int = 300) -> dict:
    """Batch-1 sampling speed of a loaded model: characters per second and first-character latency."""
    context = getattr(lm, "context", None)     # a transformer's, in tokens: the sample must fit in it
    if context:
        length = min(length, context // 2)
    start = time.perf_counter()
    first = None
    prompt = " " if lm.unknown_chars("\n") else "\n"
    for i, _ in enumerate(lm.stream(prompt, length, temperature=1.0, seed=0)):
        if i == 0:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return {"chars_per_s": length / total, "first_char_ms": 1000 * (first or 0.0), "length": length}


CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.facts { display: flex; gap: 2em; flex-wrap: wrap; } .fact b { display: block; font-size: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 12px 2px 0; text-align: left; vertical-align: top; }
th { color: #555; font-weight: normal; } img { max-width: 100%; }
pre { background: #f6f6f4; padding: 0.8em; white-space: pre-wrap; border-left: 3px solid #bbb; }
.muted { color: #777; }
"""


def write_report(run, out, force: bool = False, weights: str = "best") -> Path:
    """One self-contained HTML page: configuration, parameters, curves, best loss, samples, speed."""
    from .api import load

    run = Path(run)
    out = _check_out(out, force)
    cfg = ckpt.read_config(run)
    metrics = read_metrics(run)
    lm = load(run, weights=weights)
    speed = generation_speed(lm)
    n_params = lm.model.num_parameters()
    summary = lm.model.summary() if hasattr(lm.model, "summary") else repr(lm.model)    # a Hugging Face model's
    best = min(metrics["val"], key=lambda r: r["val_loss"], default=None)
    last_train = metrics["train"][-1] if metrics["train"] else {}
    e = html.escape

    def table(d: dict) -> str:
        rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(json.dumps(v, ensure_ascii=False))}</td></tr>"
                       for k, v in d.items())
        return f"<table>{rows}</table>"

    fig, plt = _draw_curves([run], [run.resolve().name]) if (metrics["train"] or metrics["val"]) else (None, None)
    curves = (f'<img alt="loss curves" src="data:image/png;base64,{base64.b64encode(_png(fig, plt)).decode()}">'
              if fig is not None else '<p class="muted">no losses logged yet</p>')
    step, samples = latest_samples(run)
    if samples:
        sample_html = f"<p class='muted'>at step {step}</p>" + "".join(
            f"<h3>temperature {t:g}</h3><pre>{e(text)}</pre>" for t, text in samples)
    else:
        sample_html = "<p class='muted'>no samples saved (train with --sample-every or through an epoch end)</p>"
    unit = "char" if lm.vocab.kind == "char" else "token"
    best_bpc = f"{bits_per_char(best, 'val_'):.4f} bits/char" if best else "n/a"
    best_text = f"{best['val_loss']:.4f} nats/{unit} = {best_bpc}" if best else "n/a"
    if best and best.get("val_unk_share"):
        best_text += f" over the text outside [UNK] ({best['val_unk_share']:.1%} of the characters, not scored)"
    if best and best.get("val_labels"):
        best_text += "; by label: " + ", ".join(f"{k} {v:.4f}" for k, v in best["val_labels"].items())
    facts = [
        ("best validation loss", best_bpc),
        ("parameters", f"{n_params:,}"),
        ("steps", f"{last_train.get('step', 0):,}"),
        ("training time", f"{last_train.get('time', 0) / 60:.1f} min"),
        ("generation (batch 1, CPU)", f"{speed['chars_per_s']:,.0f} chars/s"),
    ]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>charrnn report: {e(run.resolve().name)}</title>
<style>{CSS}</style></head><body>
<h1>charrnn run <code>{e(run.resolve().name)}</code></h1>
<p class="muted">{e(str(run.resolve()))} &middot; report written {time.strftime('%Y-%m-%d %H:%M')}</p>
<div class="facts">{''.join(f'<div class="fact">{e(k)}<b>{e(v)}</b></div>' for k, v in facts)}</div>
<h2>Loss</h2>{curves}
<p>Best validation loss: {e(best_text)} (weights: {e(lm.label)}).</p>
<h2>Samples</h2>{sample_html}
<h2>Generation speed</h2>
<p>{speed['length']} characters at batch 1 on CPU, fp32: {speed['chars_per_s']:,.0f} characters per second,
first character after {speed['first_char_ms']:.1f} ms.</p>
<h2>Model</h2>{table(cfg.get('model', {}))}
<p>{n_params:,} parameters:</p><pre>{e(summary)}</pre>
<h2>Corpus</h2>{table(cfg.get('corpus', {}))}
{f"<h2>Started from</h2>{table(cfg['init'])}" if cfg.get('init') else ""}
<h2>Training options</h2>{table(cfg.get('training', {}))}
</body></html>
"""
    atomic_write_text(out, page)
    return out
