"""A hostile user's command lines: refused in one line with exit status 2, and nothing of theirs lost."""

import hashlib
import subprocess
import sys

import pytest

import charrnn

from ..conftest import TINY, TINY_KW, cli


def _fingerprint(run) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def trained(small_corpus, tmp_path):
    run = tmp_path / "run"
    charrnn.train(str(small_corpus), run, progress=False, max_steps=3, **TINY_KW)
    return run


@pytest.mark.probe("force-bad-option")
@pytest.mark.parametrize("bad", [
    ["--batch-size", "100000000"],
    ["--seq-len", "100000000"],
    ["--val-fraction", "0.99999"],
    ["--seed", "1e23"],
    ["--weight-decay", "nan"],
    ["--hidden", "99999999"],
])
def test_force_with_an_impossible_option_keeps_the_run_it_would_replace(capsys, small_corpus, trained, bad):
    before = _fingerprint(trained)
    assert {"config.json", "vocab.json", "model.safetensors", "trainer-state.pt"} <= set(before)
    options = TINY.copy()
    flag = bad[0]
    if flag in options:                       # the bad value replaces TINY's own
        i = options.index(flag)
        del options[i:i + 2]
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--force", "--max-steps", 2, *options, *bad)
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert _fingerprint(trained) == before


@pytest.mark.probe("force-replaces")
def test_force_replaces_the_run_once_everything_is_checked(capsys, small_corpus, trained):
    (trained / "samples").mkdir(exist_ok=True)
    (trained / "samples" / "old.txt").write_text("old")
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--force", "--max-steps", 2, "--seed", 7,
                       *TINY)
    assert code == 0, err
    assert not (trained / "samples" / "old.txt").exists()
    assert '"seed": 7' in (trained / "config.json").read_text()


@pytest.mark.probe("nan-propagates")
@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
def test_a_nan_weight_reaches_the_same_outputs_on_every_backend(arch):
    """The fast paths propagate NaN exactly as the stock modules do (a NaN must never be hidden)."""
    import torch

    from charrnn import ops
    from charrnn.models import CharLM, ModelConfig

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=20, hidden=16, embed=8, arch=arch)).train()
    with torch.no_grad():
        model.embedding.weight[3, 0] = float("nan")
    ids = torch.randint(4, 20, (4, 6))         # id 3 (the NaN row) only at sample 0, step 2
    ids[0, 2] = 3
    masks = []
    for backend in (dict(), dict(native=False), dict(packed=False), dict(fast_rnn=False)):
        with ops.use(**backend):
            out = model(ids)
            masks.append(torch.isnan(out[0] if isinstance(out, tuple) else out))
    assert masks[-1][0, 2:].all() and not masks[-1][1:].any()
    for mask in masks[:-1]:
        assert torch.equal(mask, masks[-1])


@pytest.mark.probe("diverging-run")
def test_a_diverging_run_stops_in_one_line_and_keeps_no_nan_weights(capsys, small_corpus, tmp_path):
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", small_corpus, "--out", run, "--max-steps", 30, "--log-every", 1,
                       "--optimizer", "sgd", "--lr", "1e30", "--clip", 0, *TINY)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: the training loss became"), err
    for name in ("best.safetensors", "model.safetensors"):
        if (run / name).exists():
            assert all(torch.isfinite(t).all() for t in load_file(run / name).values()), name


@pytest.mark.probe("one-writer")
def test_one_trainer_per_run_directory_and_a_dead_holder_releases_it(capsys, small_corpus, trained):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from charrnn import checkpoint\n"
        f"with checkpoint.writer_lock({str(trained)!r}):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _fingerprint(trained)
        for args in (["--resume"], ["--force"]):
            code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--max-steps", 5, *args, *TINY)
            assert code == 2 and f"another charrnn process (pid {holder.pid})" in err.strip().splitlines()[-1], err
        assert _fingerprint(trained) == before
        code, out, err = cli(capsys, "generate", trained, "--length", 20, "--seed", 1)   # readers still read
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--max-steps", 5, "--resume", *TINY)
    assert code == 0, err


@pytest.mark.probe("refused-new-run")
def test_a_refused_new_run_leaves_no_directory_behind(capsys, small_corpus, tmp_path):
    out = tmp_path / "new"
    code, _, err = cli(capsys, "train", small_corpus, "--out", out, "--batch-size", 100000000, "--quiet")
    assert code == 2, err
    assert not out.exists()


@pytest.mark.probe("generate-sizes")
@pytest.mark.parametrize("bad,option", [
    (["--num-samples", "99999999999"], "--num-samples"),
    (["--length", "99999999999999", "--num-samples", "2"], "--length"),
    (["--beam-width", "99999999999999999999"], "--beam-width"),
])
def test_sizes_past_the_machines_memory_are_refused_before_any_work(capsys, trained, bad, option):
    capsys.readouterr()                        # the fixture's training output
    code, _, err = cli(capsys, "generate", trained, "--seed", 1, *bad)
    assert code == 2 and err.startswith(f"error: {option} is ") and "GiB of memory here" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.probe("tiny-temperature")
def test_temperatures_too_small_to_divide_by_sample_greedily(capsys, trained):
    texts = []
    for t in ("0", "1e-7", "1e-45"):
        code, out, err = cli(capsys, "generate", trained, "--seed", 1, "--length", 40, "--temperature", t)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] == texts[2]
