"""Pictures of runs: `charrnn plot` and `charrnn report`, rendered from real short runs."""

import base64
import html
import json
import math
import re

import pytest

import charrnn

from .conftest import TINY_KW, run_cli

pytestmark = pytest.mark.slow   # every test here trains models or starts processes

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from .conftest import make_text

    root = tmp_path_factory.mktemp("runs")
    corpus = root / "c.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    for name, lr in (("fast", 3e-3), ("slow", 3e-4)):
        charrnn.train(str(corpus), root / name, progress=False, epochs=2, lr=lr, eval_every=20, sample_length=60,
                      sample_temperatures=[0.5, 1.2], **TINY_KW)
    return root


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_plot_draws_both_runs_against_steps_and_time(runs, tmp_path):
    from charrnn.report import _draw_curves

    fig, plt = _draw_curves([runs / "fast", runs / "slow"], ["fast", "slow"])
    try:
        by_step, by_time = fig.axes
        labels = [line.get_label() for line in by_step.lines]
        assert labels == ["fast train", "fast validation", "slow train", "slow validation"]
        val = [r for r in metrics(runs / "slow") if "val_loss" in r]
        line = by_step.lines[3]
        assert list(line.get_xdata()) == [r["step"] for r in val]
        assert list(line.get_ydata()) == pytest.approx([r["val_loss"] / math.log(2) for r in val])
        assert list(by_time.lines[3].get_xdata()) == pytest.approx([r["time"] / 60 for r in val])
        assert [t.get_text() for t in by_time.get_legend().get_texts()] == labels
    finally:
        plt.close(fig)

    out = tmp_path / "curves.png"
    r = run_cli("plot", runs / "fast", runs / "slow", "--out", out)
    assert r.returncode == 0, r.stderr
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_plot_refuses_to_overwrite_and_bad_runs(runs, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"mine")
    r = run_cli("plot", runs / "fast", "--out", out)
    assert r.returncode == 2 and "--force" in r.stderr and r.stderr.count("\n") == 1
    assert out.read_bytes() == b"mine"
    assert run_cli("plot", runs / "fast", "--out", out, "--force").returncode == 0
    r = run_cli("plot", tmp_path / "missing", "--out", tmp_path / "y.png")
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "y.png").exists()


def test_report_is_one_self_contained_page_with_everything(runs, tmp_path):
    out = tmp_path / "report.html"
    r = run_cli("report", runs / "fast", "--out", out)
    assert r.returncode == 0, r.stderr
    page = out.read_text(encoding="utf-8")
    # Self-contained: no external resources, the curves are an inline PNG.
    assert not re.search(r'(src|href)="(?!data:)', page)
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(png).startswith(b"\x89PNG")
    # Configuration, parameter count, best validation loss.
    cfg = json.loads((runs / "fast" / "config.json").read_text())
    assert html.escape(json.dumps(cfg["training"]["lr"])) in page
    lm = charrnn.load(runs / "fast")
    assert f"{lm.model.num_parameters():,}" in page
    best = min(r["val_loss"] for r in metrics(runs / "fast") if "val_loss" in r)
    assert f"{best:.4f} nats/char" in page and f"{best / math.log(2):.4f} bits/char" in page
    # The last samples, at each temperature.
    last = max(int(p.name[4:11]) for p in (runs / "fast" / "samples").iterdir())
    for t in ("0.5", "1.2"):
        sample = (runs / "fast" / "samples" / f"step{last:07d}-t{t}.txt").read_text()
        assert f"temperature {t}" in page and html.escape(sample) in page
    # Generation speed, measured.
    speed = float(re.search(r"([\d,]+) characters per second", page).group(1).replace(",", ""))
    assert speed > 0
