"""Labelled corpora (charrnn.labels): a model trained on two labels with different alphabets learns the label
(each label's text is likelier under its own label) and generates by it; eval prints what training validated,
per label; resume is exact; the manifest form; the label on the input, the state or both; the errors."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.labels import UNLABELLED, label_weights, load_labelled

from .conftest import TINY_KW, cli

VOWELS, CAPS = "aeiou" + "lmnr", "XYZ" + "0123"


def _words(alphabet: str, n: int, seed: int) -> str:
    r = random.Random(seed)
    return " ".join("".join(r.choice(alphabet[:5]) + r.choice(alphabet[5:]) for _ in range(r.randint(1, 4)))
                    for _ in range(n))


def labelled_corpus(root, n: int = 3000):
    """Two labels with different alphabets (``soft``: vowels and l m n r; ``hard``: X Y Z and digits), and a little
    unlabelled text."""
    (root / "soft").mkdir(parents=True)
    (root / "hard").mkdir()
    (root / "soft" / "a.txt").write_text(_words(VOWELS, n, 1), encoding="utf-8")
    (root / "hard" / "b.txt").write_text(_words("XYZ" + "0123" + "XY", n, 2), encoding="utf-8")
    (root / "plain.txt").write_text("the common text. " * 100, encoding="utf-8")
    return root


FAST = dict(TINY_KW, max_steps=250, lr=1e-2, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels")
    corpus = labelled_corpus(tmp / "corpus")
    charrnn.train(str(corpus), tmp / "run", labels=True, **FAST)
    return tmp / "run"


def _share(text: str, alphabet: str) -> float:
    chars = [c for c in text if c != " "]
    return sum(c in alphabet for c in chars) / max(len(chars), 1)


@pytest.mark.slow
def test_the_label_is_learned_and_generation_obeys_it(run):
    lm = charrnn.load(run)
    assert lm.labels == [UNLABELLED, "hard", "soft"]
    scores = {(text, label): lm.evaluate(label=text)["labels"][text]["bpc"] for text in ("soft", "hard")
              for label in ("soft",)}
    assert scores
    own = lm.evaluate()["labels"]
    # Each label's validation text read under the other label costs far more.
    from charrnn.evaluation import evaluate, label_parts

    config = json.loads((run / "config.json").read_text())
    labelled = load_labelled(config["corpus"]["name"])
    parts = label_parts(labelled.splits(0.1, lm.vocab), lm.vocab)
    for k, name in enumerate(lm.labels):
        if k and k in parts:
            other = 3 - k
            crossed = evaluate(lm.model, parts[k][0], label=other)["bpc"]
            assert crossed > own[name]["bpc"] + 0.5, (name, crossed, own[name]["bpc"])
    for label, alphabet in (("soft", VOWELS), ("hard", CAPS)):
        text = lm.generate(" ", 300, temperature=0.8, seed=3, label=label)[0]
        assert _share(text, alphabet) > 0.9, (label, text[:80])


@pytest.mark.slow
def test_eval_prints_what_training_validated_per_label(run, capsys):
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "val_labels" in m][-1]
    code, out, err = cli(capsys, "eval", run, "--weights", "latest", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert abs(r["loss"] - last["val_loss"]) < 1e-6
    assert {k: round(v["bpc"], 6) for k, v in r["labels"].items()} == pytest.approx(last["val_labels"], abs=1e-5)
    code, out, _ = cli(capsys, "eval", run)
    assert code == 0 and "label soft:" in out and "label hard:" in out
    code, out, _ = cli(capsys, "eval", run, "--label", "soft", "--json")
    assert code == 0 and list(json.loads(out)["labels"]) == ["soft"]


@pytest.mark.slow
def test_generate_and_eval_refuse_an_unknown_label_naming_the_known_ones(run, capsys, tmp_path):
    for command in (("generate", run, "--prompt", "a", "--label", "loud"), ("eval", run, "--label", "loud")):
        code, _, err = cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1 and "unlabelled, hard, soft" in err, err
    code, _, err = cli(capsys, "eval", run, "--label", "soft=0.5,hard=0.5")
    assert code == 2 and "mix" in err


@pytest.mark.slow
def test_a_mix_of_labels_generates_between_them(run, monkeypatch):
    lm = charrnn.load(run)
    for label in ("soft", "hard"):      # a mix all but one label's is that label: the same greedy text
        want = lm.generate(" X", 100, temperature=0, label=label)[0]
        other = "hard" if label == "soft" else "soft"
        assert lm.generate(" X", 100, temperature=0, label=f"{label}=1,{other}=0.000001")[0] == want
    shares = [_share(lm.generate(" ", 2000, temperature=0.8, seed=1, label=label)[0], CAPS)
              for label in ("soft", "soft=0.5,hard=0.5", "hard")]
    assert shares[0] < shares[1] < shares[2], shares
    beams = lm.sampler.beam(" ", 20, 2, label="soft=0.5,hard=0.5")
    assert len(beams) == 2
    monkeypatch.setattr("charrnn.sampling.MAX_MIXES", len(lm.sampler.reader.mixes))
    with pytest.raises(charrnn.errors.OptionError, match="past the"):
        lm.generate(" ", 5, label="soft=0.3,hard=0.7")


def test_label_requests():
    labels = [UNLABELLED, "a", "b"]
    assert label_weights(None, labels).tolist() == [1, 0, 0]
    assert label_weights("b", labels).tolist() == [0, 0, 1]
    assert label_weights("a=3, b=1", labels).tolist() == [0, 0.75, 0.25]
    for bad in ("c", "a=0", "a=-1", "a=nan", "a=x"):
        with pytest.raises(charrnn.errors.OptionError, match="label"):
            label_weights(bad, labels)


@pytest.mark.slow
def test_resume_of_a_labelled_run_is_exact(tmp_path):
    corpus = labelled_corpus(tmp_path / "corpus", 800)
    kw = dict(FAST, max_steps=12, eval_every=6, sample_every=0)
    charrnn.train(str(corpus), tmp_path / "whole", labels=True, **kw)
    charrnn.train(str(corpus), tmp_path / "half", labels=True, **{**kw, "max_steps": 6})
    charrnn.train(str(corpus), tmp_path / "half", resume=True, **kw)
    a, b = (ckpt.load_run(tmp_path / name, weights="latest").model.state_dict() for name in ("whole", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("arch,label_on", [("lstm", "state"), ("gru", "both"), ("rnn", "input"),
                                           ("mingru", "input")])
def test_every_cell_and_place_of_the_label_learns_it(tmp_path, arch, label_on):
    corpus = labelled_corpus(tmp_path / "corpus", 1500)
    charrnn.train(str(corpus), tmp_path / "run", labels=True, arch=arch, label_on=label_on,
                  **{**FAST, "max_steps": 200})
    lm = charrnn.load(tmp_path / "run")
    text = lm.generate(" ", 200, temperature=0.5, seed=1, label="hard")[0]
    assert _share(text, CAPS) > 0.8, text[:80]


@pytest.mark.slow
def test_a_stateful_labelled_run_trains_validates_and_generates(tmp_path):
    """Stateful training carries the state across batches, so the text before a window already tells its label
    and the label is learned weakly (docs/labels.md); what is checked here is that it runs end to end."""
    corpus = labelled_corpus(tmp_path / "corpus", 1500)
    charrnn.train(str(corpus), tmp_path / "run", labels=True, stateful=True, **{**FAST, "max_steps": 100})
    lm = charrnn.load(tmp_path / "run")
    assert set(lm.evaluate()["labels"]) == {UNLABELLED, "hard", "soft"}
    assert len(lm.generate("X", 50, seed=1, label="hard")[0]) == 51


@pytest.mark.slow
def test_a_manifest_reads_as_the_folder_does(tmp_path):
    corpus = labelled_corpus(tmp_path / "corpus", 500)
    manifest = tmp_path / "corpus.tsv"
    manifest.write_text("soft\tcorpus/soft/a.txt\nhard\tcorpus/hard\n\tcorpus/plain.txt\n", encoding="utf-8")
    a, b = load_labelled(str(corpus), progress=False), load_labelled(str(manifest), progress=False)
    assert a.labels == b.labels and a.vocab == b.vocab
    assert all(np.array_equal(a.ids(k), b.ids(k)) for k in range(len(a.labels)))


def test_bad_labelled_corpora_are_one_line(tmp_path, capsys):
    plain = tmp_path / "plain.txt"
    plain.write_text("some text " * 100)
    no_labels = tmp_path / "nolabels"
    no_labels.mkdir()
    (no_labels / "x.txt").write_text("text " * 100)
    empty = labelled_corpus(tmp_path / "empty", 50)
    (empty / "silent").mkdir()
    bad_manifest = tmp_path / "bad.tsv"
    bad_manifest.write_text("soft no tab here\n")
    missing = tmp_path / "missing.tsv"
    missing.write_text("soft\tnowhere.txt\n")
    comma = labelled_corpus(tmp_path / "comma", 50)
    (comma / "soft").rename(comma / "so,ft")
    cases = [(plain, "neither a folder of label folders"), (no_labels, "no label folders"),
             (empty, "silent"), (bad_manifest, "not label<TAB>path"), (missing, "does not exist"),
             (comma, "holds ',' or '='")]
    for corpus, message in cases:
        out = tmp_path / f"run-{corpus.name}"
        code, _, err = cli(capsys, "train", corpus, "--out", out, "--labels", "--max-steps", "1")
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out.exists()


@pytest.mark.slow
def test_resuming_with_another_corpus_kind_is_one_line(run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    plain = tmp_path / "plain.txt"
    plain.write_text("some text " * 200)
    code, _, err = cli(capsys, "train", plain, "--out", copy, "--resume", "--max-steps", "300")
    assert code == 2 and err.count("\n") == 1 and "label" in err, err
    unlabelled = tmp_path / "unlabelled"
    charrnn.train(str(plain), unlabelled, **{**FAST, "max_steps": 2})
    corpus = labelled_corpus(tmp_path / "corpus", 300)
    code, _, err = cli(capsys, "train", corpus, "--out", unlabelled, "--resume", "--labels", "--max-steps", "4")
    assert code == 2 and err.count("\n") == 1 and "labels" in err, err
    code, _, err = cli(capsys, "generate", unlabelled, "--prompt", "s", "--label", "soft")
    assert code == 2 and "no labels" in err


@pytest.mark.slow
def test_serve_generates_by_label_and_batches_labels_together(run):
    import concurrent.futures

    import httpx

    from charrnn.serve import Limits, create_app

    from .conftest import running

    lm = charrnn.load(run)
    app = create_app(lm, Limits(max_batch=16))
    with running(app) as url:
        def generate(label, seed):
            body = {"prompt": " ", "length": 120, "temperature": 0.8, "seed": seed, "label": label}
            return httpx.post(f"{url}/v1/generate", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:      # labels side by side in the server's batch
            answers = list(pool.map(generate, ["soft", "hard", None] * 2, range(6)))
        for (label, seed), r in zip([("soft", 0), ("hard", 1), (None, 2)] * 2, answers):
            assert r.status_code == 200, r.text
            assert r.json()["samples"] == lm.generate(" ", 120, temperature=0.8, seed=r.json()["seed"],
                                                      label=label)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": " ", "max_tokens": 100, "seed": 5,
                                                       "label": "hard"}, timeout=60)
        assert r.status_code == 200 and _share(r.json()["choices"][0]["text"], CAPS) > 0.9
        for path, body in (("/v1/generate", {"prompt": "a", "label": "loud"}),
                           ("/v1/completions", {"prompt": "a", "label": "loud"})):
            r = httpx.post(f"{url}{path}", json=body, timeout=60)
            assert r.status_code in (400, 422) and "unlabelled, hard, soft" in r.text, r.text


@pytest.mark.slow
@pytest.mark.parametrize("label_on", ["input", "both"])
def test_export_runtime_and_page_generate_by_label_as_pytorch_does(tmp_path, label_on):
    from charrnn import runtime
    from charrnn.export import export_onnx
    from charrnn.web_export import export_web

    from .test_web_export import Page
    from .conftest import browser

    corpus = labelled_corpus(tmp_path / "corpus", 1500)
    charrnn.train(str(corpus), tmp_path / "run", labels=True, label_on=label_on, **{**FAST, "max_steps": 150})
    lm = charrnn.load(tmp_path / "run")
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    rt = runtime.load(tmp_path / "m.onnx")
    assert rt.labels == lm.labels
    page_folder = export_web(tmp_path / "run", tmp_path / "page", precision="fp32").path
    driver = browser()
    try:
        page = Page(driver, page_folder)
        assert page.ready, page.error
        shown = [o.text for o in driver.find_elements("css selector", "#label option")]
        assert shown == lm.labels
        for label in (None, "soft", "hard"):
            want = lm.generate(" X", 80, temperature=0, label=label)[0]
            assert rt.generate(" X", 80, temperature=0, label=label)[0] == want
            page.set(label=label or "")
            assert " X" + page.generate(prompt=" X", temperature=0, length=80)["texts"][0] == want
        seeded = rt.generate(" ", 80, temperature=0.9, seed=5, label="soft")[0]
        page.set(label="soft")
        assert " " + page.generate(prompt=" ", temperature=0.9, seed=5, length=80)["texts"][0] == seeded
    finally:
        driver.quit()
    with pytest.raises(charrnn.errors.OptionError, match="unlabelled, hard, soft"):
        rt.generate(" ", 5, label="loud")


@pytest.mark.slow
def test_report_and_plot_draw_every_labels_curve(run, tmp_path, capsys):
    from charrnn.report import read_metrics

    assert all("val_labels" in r for r in read_metrics(run)["val"])
    code, _, err = cli(capsys, "report", run, "--out", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "by label: unlabelled" in page and "soft" in page and "hard" in page
    code, _, err = cli(capsys, "plot", run, "--out", tmp_path / "p.png")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 1000, err


@pytest.mark.slow
def test_a_labelled_run_starts_from_a_plain_run(tmp_path):
    corpus = labelled_corpus(tmp_path / "corpus", 1500)
    plain = tmp_path / "plain.txt"
    plain.write_text("the common text, and some other words. " * 200, encoding="utf-8")
    charrnn.train(str(plain), tmp_path / "base", **{**FAST, "max_steps": 30})
    charrnn.train(str(corpus), tmp_path / "run", labels=True, init_from=str(tmp_path / "base"),
                  **{**FAST, "max_steps": 200})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["init"]["from"] == str((tmp_path / "base").resolve()) and config["labels"][0] == UNLABELLED
    lm = charrnn.load(tmp_path / "run")
    assert _share(lm.generate(" ", 200, temperature=0.5, seed=1, label="hard")[0], CAPS) > 0.8
    charrnn.train(str(corpus), tmp_path / "run", resume=True, **{**FAST, "max_steps": 210})


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_word_and_bpe_labelled_runs(tmp_path, capsys, tokenizer):
    from charrnn import runtime
    from charrnn.export import export_onnx

    corpus = labelled_corpus(tmp_path / "corpus", 1500)
    extra = {"max_vocab": 300} if tokenizer == "bpe" else {}
    charrnn.train(str(corpus), tmp_path / "run", labels=True, tokenizer=tokenizer, **extra,
                  **{**FAST, "max_steps": 400})
    lm = charrnn.load(tmp_path / "run")
    assert lm.vocab.kind == tokenizer
    assert _share(lm.generate(" ", 200, temperature=0.5, seed=1, label="hard")[0], CAPS) > 0.8
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "val_labels" in line][-1]
    code, out, err = cli(capsys, "eval", tmp_path / "run", "--weights", "latest", "--json")
    assert code == 0, err
    assert abs(json.loads(out)["loss"] - last["val_loss"]) < 1e-6
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    rt = runtime.load(tmp_path / "m.onnx")
    for label in ("soft", "hard"):
        assert rt.generate(" X", 60, temperature=0, label=label) == lm.generate(" X", 60, temperature=0, label=label)
