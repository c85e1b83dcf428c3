"""`charrnn export --format web`: the page opened from file:// in headless Chromium generates the text
`charrnn generate` gives (greedy: the PyTorch sampler's, for a character, a word and a BPE run; seeded: the
torch-free runtime's), stops, handles unknown and long prompts and stop texts, fits a phone and a keyboard;
charrnn.js works in a page of one's own as the docs show; the weights' default; the vendored files."""

import base64
import gzip
import hashlib
import json
import re
import time
from pathlib import Path

import pytest

import charrnn
from charrnn import runtime
from charrnn.export import export_onnx, step_graph
from charrnn.portable_random import PortableRandom
from charrnn.web_export import (
    FOLD_WEIGHTS,
    INT8_TOLERANCE,
    PAGE_FILES,
    VENDOR_FILES,
    choose_weights,
    export_web,
    weight_only_int8,
)

from .conftest import TINY_KW, browser, make_text

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "charrnn" / "web" / "vendor"
EXTRA = "\nünïcödé — 日本語のテキスト 🙂🙃! Tabs\there,  runs   of spaces;\n"


def _train(tmp: Path, name: str, **kw) -> Path:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(make_text(20_000) + EXTRA, encoding="utf-8")
    charrnn.train(str(corpus), tmp / name, max_steps=40, lr=3e-3, progress=False, log=lambda m: None,
                  **TINY_KW, **kw)
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A character, a word and a BPE run, each exported as a page with fp32 weights (the PyTorch model's
    numbers, for greedy equality)."""
    tmp = tmp_path_factory.mktemp("web")
    made = {"char": _train(tmp, "char"), "word": _train(tmp, "word", tokenizer="word"),
            "bpe": _train(tmp, "bpe", tokenizer="bpe", max_vocab=300)}
    return {kind: (run, export_web(run, tmp / f"page-{kind}", precision="fp32").path) for kind, run in made.items()}


@pytest.fixture(scope="module")
def chromium():
    driver = browser()
    yield driver
    driver.quit()


class Page:
    """The exported page in the browser, driven as a user drives it."""

    def __init__(self, driver, where):
        """``where``: an exported folder (opened from file://) or a URL."""
        self.driver = driver
        driver.get((where / "index.html").as_uri() if isinstance(where, Path) else where)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = driver.execute_script("const p = window.charrnnPage; return p && [p.ready, p.error || null]")
            if state and (state[0] or state[1]):
                break
            time.sleep(0.05)
        self.ready, self.error = state

    def text(self, element_id: str) -> str:
        return self.driver.find_element("id", element_id).text

    def set(self, **fields) -> None:
        for name, value in fields.items():
            self.driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]",
                                       name.replace("_", "-"), str(value))

    def generate(self, timeout: float = 60, **fields) -> dict:
        self.set(**fields)
        self.driver.execute_script("charrnnPage.lastRun = null")
        self.driver.find_element("id", "generate").click()
        return self.finished(timeout)

    def finished(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.driver.execute_script("return charrnnPage.lastRun")
            if run and run["finished"]:
                return run
            time.sleep(0.05)
        raise AssertionError("the page did not finish generating")


def greedy(run: Path, prompt: str, length: int, **options) -> str:
    """`charrnn generate RUN --temperature 0`'s text (the PyTorch sampler), prompt included."""
    return charrnn.load(run).generate(prompt, length, temperature=0, **options)[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind,prompt", [("char", "the quick brown"), ("word", "ünïcödé the qu"),
                                         ("bpe", "ünïcödé the qu")])
def test_greedy_text_in_the_page_equals_charrnn_generate(runs, chromium, kind, prompt):
    run, folder = runs[kind]
    page = Page(chromium, folder)
    assert page.ready, page.error
    assert folder.as_uri().startswith("file://")
    got = page.generate(prompt=prompt, temperature=0, length=120)
    assert got["chars"] == 120 and not got["stopped"]
    assert prompt + got["texts"][0] == greedy(run, prompt, 120)
    assert page.driver.find_element("css selector", "pre.sample").text == prompt + got["texts"][0]
    assert re.search(r"Done: 120 characters", page.text("status")) and page.text("speed").endswith("characters/s")


@pytest.mark.slow
def test_the_folder_works_from_a_static_http_server(runs, chromium):
    import functools
    import http.server
    import threading

    run, folder = runs["char"]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = Page(chromium, f"http://127.0.0.1:{server.server_address[1]}/")
        assert page.ready, page.error
        got = page.generate(prompt="the ", temperature=0, length=80)
        assert "the " + got["texts"][0] == greedy(run, "the ", 80)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_unknown_prompt_characters_are_read_as_unk_and_named(runs, chromium):
    run, folder = runs["char"]
    prompt = "Zebra ☃ the "                      # Z and ☃ are not in the corpus
    unknown = charrnn.load(run).unknown_chars(prompt)
    assert unknown
    page = Page(chromium, folder)
    got = page.generate(prompt=prompt, temperature=0, length=60)
    assert prompt + got["texts"][0] == greedy(run, prompt, 60)
    status = page.text("status")
    assert "read as [UNK]" in status and all(json.dumps(c, ensure_ascii=False) in status for c in unknown)


@pytest.mark.slow
def test_a_2000_character_prompt(runs, chromium):
    run, folder = runs["char"]
    prompt = make_text(2000, seed=5)[:2000]
    got = Page(chromium, folder).generate(prompt=prompt, temperature=0, length=50)
    assert prompt + got["texts"][0] == greedy(run, prompt, 50)


@pytest.mark.slow
def test_a_seed_gives_the_same_text_every_time_and_the_runtimes_text(runs, chromium, tmp_path):
    run, folder = runs["char"]
    options = dict(prompt="the ", temperature=0.9, top_k=12, top_p=0.95, seed=4242, samples=3, length=150)
    page = Page(chromium, folder)
    first, second = page.generate(**options), page.generate(**options)
    assert first["texts"] == second["texts"] and len(set(first["texts"])) == 3
    export_onnx(run, tmp_path / "m.onnx")
    want = runtime.load(tmp_path / "m.onnx").generate("the ", 150, num_samples=3, temperature=0.9, top_k=12,
                                                       top_p=0.95, seed=4242)
    assert ["the " + t for t in first["texts"]] == want
    other = page.generate(**{**options, "seed": 4243})
    assert other["texts"] != first["texts"]


@pytest.mark.slow
def test_the_random_generator_is_the_same_in_python_and_javascript(runs, chromium):
    Page(chromium, runs["char"][1])
    seeds = [0, 1, 4242, 2**63 - 1]
    got = chromium.execute_script(
        "return arguments[0].map((s) => { const r = new charrnn.PortableRandom(BigInt(s)); "
        "return [0, 1, 2, 3, 4].map(() => r.uniform()); })", [str(s) for s in seeds])
    for seed, values in zip(seeds, got):
        r = PortableRandom(seed)
        assert values == [r.uniform() for _ in range(5)]


@pytest.mark.slow
def test_the_stop_button_stops(runs, chromium):
    page = Page(chromium, runs["char"][1])
    page.set(prompt="the ", temperature=1, length=10_000_000)
    chromium.find_element("id", "generate").click()
    deadline = time.monotonic() + 30
    while chromium.execute_script("return document.querySelector('pre.sample').textContent.length") < 300:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert chromium.find_element("id", "generate").get_attribute("disabled")
    chromium.find_element("id", "stop-button").click()
    run = page.finished(10)
    assert run["stopped"] and 0 < run["chars"] < 10_000_000
    shown = chromium.execute_script("return document.querySelector('pre.sample').textContent")
    time.sleep(0.3)
    assert chromium.execute_script("return document.querySelector('pre.sample').textContent") == shown
    assert "Stopped" in page.text("status") and chromium.find_element("id", "generate").is_enabled()


@pytest.mark.slow
def test_a_stop_text_ends_the_sample_before_it(runs, chromium):
    page = Page(chromium, runs["char"][1])
    options = dict(prompt="the ", temperature=1, length=300, seed=7)
    text = page.generate(**options)["texts"][0]
    k = next(k for k in range(40, 290) if text.index(text[k:k + 3]) == k)   # a stop first met at k
    typed = text[k:k + 3].replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    got = page.generate(**options, stop=typed)
    assert got["texts"][0] == text[:k] and "Done" in page.text("status")


@pytest.mark.slow
def test_a_phone_and_a_keyboard_alone(runs, tmp_path):
    driver = browser(width=375, height=740)
    try:
        page = Page(driver, runs["char"][1])
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        from selenium.webdriver.common.keys import Keys

        prompt = driver.find_element("id", "prompt")
        prompt.click()
        prompt.send_keys("the qu")
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)      # Ctrl+Enter generates
        run = page.finished()
        assert run["chars"] > 0 and not run["stopped"]
        order = []                                      # every control is reached with Tab, in reading order
        for _ in range(12):
            driver.switch_to.active_element.send_keys(Keys.TAB)
            order.append(driver.switch_to.active_element.get_attribute("id"))
        assert order[:8] == ["length", "temperature", "top-k", "top-p", "seed", "stop", "samples", "generate"]
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_documented_example_runs_in_a_page_of_ones_own(runs, chromium):
    """docs/web.md's ten-line example, as written, beside an exported model."""
    doc = (ROOT / "docs" / "web.md").read_text(encoding="utf-8")
    example = re.search(r"```html\n(.*?)```", doc, re.S).group(1)
    assert len(example.strip().splitlines()) <= 12
    folder = runs["char"][1]
    (folder / "mine.html").write_text(example, encoding="utf-8")
    chromium.get((folder / "mine.html").as_uri())
    deadline = time.monotonic() + 30
    while len(chromium.find_element("id", "out").text) < 200:
        assert time.monotonic() < deadline, chromium.find_element("tag name", "body").text
        time.sleep(0.05)


@pytest.mark.slow
def test_int8_is_the_default_only_within_the_tolerance(runs, monkeypatch):
    run = runs["char"][0]
    loaded = charrnn.checkpoint.load_run(run)
    kind, graph, bpc, note = choose_weights(loaded, "auto")
    assert set(bpc) == {"fp32", "int8"} and bpc["fp32"] > 0
    assert kind == ("int8" if bpc["int8"] - bpc["fp32"] <= INT8_TOLERANCE else "fp32") and kind in note
    monkeypatch.setattr("charrnn.web_export.INT8_TOLERANCE", bpc["int8"] - bpc["fp32"] - 1e-6)
    assert choose_weights(loaded, "auto")[0] == "fp32"
    assert choose_weights(loaded, "fp32")[:2] == ("fp32", charrnn.export.step_graph(loaded.model).SerializeToString())
    assert choose_weights(loaded, "int8")[0] == "int8"


@pytest.mark.slow
def test_weight_only_int8_stores_int8_matrices_and_computes_nearly_fp32(runs):
    import numpy as np
    import onnx
    import onnxruntime as ort

    loaded = charrnn.checkpoint.load_run(runs["bpe"][0], weights="best")
    fp32 = step_graph(loaded.model)
    int8 = weight_only_int8(step_graph(loaded.model))
    matrices = [i for i in int8.graph.initializer if len(i.dims) == 2]
    assert matrices and all(i.data_type == onnx.TensorProto.INT8 for i in matrices)
    assert len(int8.SerializeToString()) < 0.4 * len(fp32.SerializeToString())
    options = ort.SessionOptions()
    options.add_session_config_entry(*FOLD_WEIGHTS)
    sessions = [ort.InferenceSession(g.SerializeToString(), options) for g in (fp32, int8)]
    ids = loaded.vocab.encode(make_text(300, seed=3)).astype(np.int64)
    state = [np.zeros((1, 1, 48), np.float32)] * 2
    for i in ids:
        out = [s.run(None, {"ids": np.array([i]), "h": h}) for s, h in zip(sessions, state)]
        state = [o[1] for o in out]
        scale = np.abs(out[0][0]).max()
        assert np.abs(out[0][0] - out[1][0]).max() < 0.02 * scale


@pytest.mark.slow
def test_the_folder_holds_every_file_and_the_model_its_weights(runs):
    folder = runs["word"][1]
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["charrnn.js", "index.html", "model.js", "page.js", "style.css", "vendor/LICENSES.txt",
                     "vendor/charrnn-vendor.js", "vendor/ort-wasm.js"]
    text = (folder / "model.js").read_text(encoding="ascii")
    model = json.loads(text[text.index(").model = ") + 10:].rstrip().rstrip(";"))
    assert model["weights"] == "fp32" and model["vocab"]["kind"] == "word" and model["state"] == ["h"]
    assert gzip.decompress(base64.b64decode(model["onnx"]))[:2] == b"\x08\x08"   # an ONNX ModelProto, IR 8


def test_the_vendored_javascript_is_what_the_manifest_and_lockfile_say():
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    assert sha((VENDOR / "charrnn-vendor.js").read_bytes()) == manifest["charrnn-vendor.js"]
    wasm = (VENDOR / "ort-wasm.js").read_text(encoding="ascii")
    packed = re.search(r'\.wasm = "([A-Za-z0-9+/=]+)";', wasm).group(1)
    assert sha(gzip.decompress(base64.b64decode(packed))) == manifest["ort-wasm.js (decoded)"]
    assert sha((ROOT / "web" / "package-lock.json").read_bytes()) == manifest["package-lock.json"]
    pinned = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]
    assert {k: v for k, v in manifest["packages"].items() if k in pinned} == pinned


def test_the_package_ships_the_page_files_export_copies():
    web = ROOT / "charrnn" / "web"
    assert sorted(p.name for p in web.iterdir() if p.is_file()) == sorted(PAGE_FILES)
    assert sorted(p.name for p in VENDOR.iterdir()) == sorted([*VENDOR_FILES, "manifest.json"])
