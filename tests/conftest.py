import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine.",
    "all that glitters is not gold.",
    "to be or not to be, that is the question.",
    "the early bird catches the worm.",
    "ROMEO: what light through yonder window breaks?",
]


def make_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        s = rng.choice(SENTENCES) + ("\n" if rng.random() < 0.3 else " ")
        parts.append(s)
        size += len(s)
    return "".join(parts)[:n_chars]


def unigram_entropy(text: str) -> float:
    """Entropy of the character distribution in nats."""
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.fixture(autouse=True)
def charrnn_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("charrnn_home")
    monkeypatch.setenv("CHARRNN_HOME", str(home))
    monkeypatch.delenv("CHARRNN_DATA", raising=False)
    return home


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(make_text(20_000), encoding="utf-8")
    return path


# Options for a model that trains in a second or two, in float32 on every CPU: `auto` picks bf16
# where the CPU has it natively, and many tests compare runs exactly (test_training.py and
# test_fast_rnn.py test bf16 by name).
TINY = ["--hidden", "48", "--embed", "16", "--seq-len", "32", "--batch-size", "16", "--precision", "fp32", "--quiet"]
TINY_KW = dict(hidden=48, embed=16, seq_len=32, batch_size=16, precision="fp32")


def cli(capsys, *args):
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    from charrnn.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args, env=None, timeout=300, input=None):
    """Run the real `charrnn` entry point in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, input=input)


@pytest.fixture(scope="session")
def compiled():
    """charrnn's compiled kernels (built on first use); skipped where they are turned off or there is no
    C++ toolchain, a failure where there is one and the build still fails."""
    import warnings

    from charrnn import native, ops

    if not ops.backend.current().native:
        pytest.skip("CHARRNN_NATIVE=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = native.load()
    if module is None:
        if shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja"):
            pytest.fail(f"a compiler and ninja are here, but the extension did not build: {native.error()}")
        pytest.skip(f"no C++ toolchain: {native.error()}")
    return module


def train_tiny_run(tmp_path_factory, name: str, max_steps: int) -> Path:
    """A tiny run trained for ``max_steps`` on 20,000 characters (its own CHARRNN_HOME), for module fixtures."""
    import charrnn

    tmp = tmp_path_factory.mktemp(name)
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(tmp / "home"))
        charrnn.train(str(corpus), tmp / "run", max_steps=max_steps, progress=False, log=lambda m: None, **TINY_KW)
    return tmp / "run"


@contextmanager
def serving(config):
    """Run a uvicorn server of ``config`` (a ``uvicorn.Config``) in a thread on a free localhost port; yields
    the port."""
    import threading
    import time

    import uvicorn

    from charrnn.serve import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


@contextmanager
def running(app):
    """Serve ``app`` (from :func:`charrnn.serve.create_app`) with uvicorn in a thread on a free localhost port;
    yields the base URL."""
    import uvicorn

    with serving(uvicorn.Config(app, log_level="warning")) as port:
        yield f"http://127.0.0.1:{port}"


def browser(width: int = 1200, height: int = 900):
    """Debian's headless Chromium through selenium (skipped without it, failed under CHARRNN_REQUIRE_BROWSER)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CHARRNN_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)
