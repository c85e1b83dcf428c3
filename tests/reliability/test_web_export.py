"""A hostile user's `charrnn export --format web`, and the exported page given damaged files and bad options:
one line and nothing written at export; a readable message in the page, never a blank one."""

import base64
import gzip
import json
import os
import re
import shutil
import time

import numpy as np
import onnx
import pytest

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.web_export import MODEL_FILE, export_web

from ..conftest import TINY_KW, browser, cli, make_text
from .test_corpora import one_line_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web_hostile")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_text(8000), encoding="utf-8")
    runs = {}
    for kind in ("char", "word"):
        charrnn.train(str(corpus), tmp / kind, tokenizer=kind, max_steps=3, progress=False, log=lambda m: None,
                      **TINY_KW)
        runs[kind] = tmp / kind
    page = export_web(runs["char"], tmp / "page", precision="fp32").path
    other = export_web(runs["word"], tmp / "other", precision="fp32").path
    return {"tmp": tmp, "runs": runs, "page": page, "other": other}


def _snapshot(path):
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() else None


@pytest.mark.probe("web-export-hostile")
def test_hostile_outs_and_runs_are_one_line_and_change_nothing(setup, tmp_path, capsys):
    run = setup["runs"]["char"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("mine")
    page = shutil.copytree(setup["page"], tmp_path / "page")
    damaged = shutil.copytree(run, tmp_path / "damaged")
    (damaged / "config.json").write_text("{not json")
    hf = shutil.copytree(run, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model"] = {"kind": ckpt.HF_KIND}
    (hf / "config.json").write_text(json.dumps(cfg))
    cases = [(run, a_file, "is a file"), (run, fifo, "is a file"), (run, others, "holds other files"),
             (run, run / "web", "inside the run"), (run, tmp_path / "no" / "such", "does not exist"),
             (run, page, "--force"), (damaged, tmp_path / "new1", "config.json"),
             (hf, tmp_path / "new2", "Hugging Face")]
    before = {p: _snapshot(p) for p in (a_file.parent,)}
    for source, out, naming in cases:
        code, _, err = cli(capsys, "export", source, "--format", "web", "--out", out)
        one_line_error(code, err, naming)
    assert {p: _snapshot(p) for p in before} == before
    assert not (run / "web").exists() and not (tmp_path / "new1").exists() and not (tmp_path / "new2").exists()
    code, _, err = cli(capsys, "export", run, "--format", "web", "--out", tmp_path / "x", "--int8", "--fp32")
    assert code == 2 and "not allowed with argument" in err and not (tmp_path / "x").exists()


@pytest.mark.probe("web-export-hostile")
def test_force_replaces_a_page_and_a_failed_export_leaves_the_old_one(setup, tmp_path, capsys, monkeypatch):
    page = shutil.copytree(setup["page"], tmp_path / "page")
    (page / "extra.txt").write_text("left over")
    before = _snapshot(page)

    def fail(folder, model):
        (folder / "index.html").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr("charrnn.web_export._write_folder", fail)
    with pytest.raises(KeyboardInterrupt):
        export_web(setup["runs"]["word"], page, force=True)
    assert _snapshot(page) == before and sorted(p.name for p in tmp_path.iterdir()) == ["page"]
    monkeypatch.undo()
    code, _, err = cli(capsys, "export", setup["runs"]["word"], "--format", "web", "--out", page, "--force")
    assert code == 0, err
    assert not (page / "extra.txt").exists() and '"kind": "word"' in (page / MODEL_FILE).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page"]


# ----- the page ---------------------------------------------------------------------------------------------


def _load(driver, folder):
    driver.get((folder / "index.html").as_uri())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = driver.execute_script("const p = window.charrnnPage; return p && [p.ready, p.error || null]")
        if state and (state[0] or state[1]):
            return state
        time.sleep(0.05)
    raise AssertionError("the page neither loaded nor said why")


def _model(folder):
    text = (folder / MODEL_FILE).read_text()
    return json.loads(text[text.index(").model = ") + 10:].rstrip().rstrip(";"))


def _write_model(folder, model):
    (folder / MODEL_FILE).write_text(f"(globalThis.charrnnFiles = globalThis.charrnnFiles || {{}}).model = "
                                     f"{json.dumps(model)};\n")


def _foreign_graph() -> bytes:
    """An ONNX model that is not a charrnn step: one input x, y = x + 1."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              initializer=[onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


@pytest.mark.probe("web-page-hostile")
def test_damaged_missing_and_foreign_model_files_are_named_in_the_page(setup, tmp_path):
    model = _model(setup["page"])
    pack = lambda data: base64.b64encode(gzip.compress(data)).decode()  # noqa: E731
    cases = {
        "missing": (None, "model.js did not load"),
        "truncated": ((setup["page"] / MODEL_FILE).read_text()[:5000], "model.js did not load"),
        "foreign script": ("window.somethingElse = 1;", "model.js did not load"),
        "not a model": ("(globalThis.charrnnFiles = globalThis.charrnnFiles || {}).model = {\"hello\": 1};",
                        "not a model written by"),
        "format": ({**model, "format": 99}, "has format 99"),
        "graph": ({**model, "onnx": pack(_foreign_graph())}, "graph reads x"),
        "bytes": ({**model, "onnx": pack(b"\x08\x08garbage" * 50)}, "onnxruntime cannot load"),
        "base64": ({**model, "onnx": "@@@@"}, "does not decode"),
        "vocabulary": ({**model, "vocab": {"kind": "word", "tokenizer": 5}}, "its vocabulary"),
        "vocab size": ({**model, "vocab": {"kind": "char", "chars": "ab"}}, "scores"),
    }
    driver = browser()
    try:
        for name, (content, message) in cases.items():
            folder = shutil.copytree(setup["page"], tmp_path / name.replace(" ", "-"))
            if content is None:
                (folder / MODEL_FILE).unlink()
            elif isinstance(content, str):
                (folder / MODEL_FILE).write_text(content)
            else:
                _write_model(folder, content)
            ready, error = _load(driver, folder)
            shown = driver.find_element("id", "error").text
            assert not ready and message in error and shown == error, (name, error)
            assert "export" in shown and not driver.find_element("id", "generate").is_enabled(), name
        other = shutil.copytree(setup["page"], tmp_path / "another-run")
        shutil.copy(setup["other"] / MODEL_FILE, other / MODEL_FILE)     # another run's model: that model
        assert _load(driver, other)[0] and "word vocabulary" in driver.find_element("id", "about").text
    finally:
        driver.quit()


@pytest.mark.probe("web-page-hostile")
def test_bad_options_fail_that_generation_only(setup):
    bad = [("length", "-5", "length must be >= 0"), ("length", "2.5", "length must be >= 0"),
           ("temperature", "-1", "temperature must be >= 0"), ("temperature", "1e39", "at most 1e38"),
           ("top-k", "0", "topK must be a positive integer"), ("top-k", "2.5", "topK must be"),
           ("top-p", "0", "topP must be in (0, 1]"), ("top-p", "1.5", "topP must be in (0, 1]"),
           ("seed", "-1", "seed must be an integer"), ("seed", "1e30", "seed must be an integer"),
           ("seed", "9223372036854775808", "seed must be an integer"), ("samples", "0", "numSamples must be"),
           ("samples", "100000", "at most 64 in this page")]
    driver = browser()
    try:
        assert _load(driver, setup["page"])[0]
        for field, value, message in bad:
            driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, value)
            driver.execute_script("charrnnPage.lastRun = null")
            driver.find_element("id", "generate").click()
            deadline = time.monotonic() + 10
            while not driver.find_element("id", "error").is_displayed():
                assert time.monotonic() < deadline, (field, value)
                time.sleep(0.05)
            assert message in driver.find_element("id", "error").text, (field, value)
            assert driver.find_element("id", "generate").is_enabled()
            driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field,
                                  {"length": "20", "samples": "1"}.get(field, ""))
        driver.execute_script("document.getElementById('temperature').value = '0'")
        driver.find_element("id", "generate").click()          # the page still generates
        deadline = time.monotonic() + 10
        while not (driver.execute_script("return charrnnPage.lastRun") or {}).get("finished"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert driver.execute_script("return charrnnPage.lastRun.chars") == 20
        assert not driver.find_element("id", "error").is_displayed()
        api = driver.execute_async_script("""
            const done = arguments[arguments.length - 1], lm = charrnnPage.model, out = [];
            const tries = [{ colour: 1 }, { topK: "5" }, { temperature: NaN }, { stop: [""] },
                           { numSamples: 1e9 + 0.5 }, { numSamples: 1e9 }];
            (async () => {
              for (const options of tries) {
                try { await lm.generate("the", options); out.push("accepted"); }
                catch (e) { out.push(e.name + ": " + e.message); }
              }
              done(out);
            })();""")
        assert all(a.startswith("CharrnnError: ") for a in api), api
        assert re.search("unknown option colour", api[0]) and "topK" in api[1] and "temperature" in api[2]
        assert "numSamples must be" in api[4] and "numSamples 1000000000 needs" in api[5]
    finally:
        driver.quit()
