"""Corrupt and foreign run files: every command that reads a run answers a damaged file, or one of
another run, with one line naming the file and what to do (exit 2), and changes nothing in the run.

Two tiny runs are trained once per module: ``run`` (GRU 48 on one corpus) and ``other`` (LSTM 32 on
an upper-case corpus: another vocabulary and another model), whose files stand in as "foreign".
The fast subset runs every damage against ``generate`` and every command against one damage per
file; the whole cross product (file x damage x command) is marked slow.

Policy for ``metrics.jsonl`` (checkpoint._metric_lines): a last line without its newline that does
not parse is a write torn by a kill and is dropped silently (resume rewrites the file without it);
any other line that is not a record is refused in one line naming the file and the line number.
"""

import hashlib
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import charrnn
from charrnn.errors import CharRNNError

from ..conftest import TINY_KW, cli, make_text

RUN_FILES = ("config.json", "vocab.json", "best.safetensors", "model.safetensors", "trainer-state.pt",
             "metrics.jsonl")
COMMANDS = ("generate", "eval", "export", "resume", "report", "serve")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("files")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(base / "home"))
        (base / "small.txt").write_text(make_text(20_000), encoding="utf-8")
        (base / "other.txt").write_text(make_text(20_000, seed=3).upper() + "#", encoding="utf-8")
        common = dict(progress=False, max_steps=2, log_every=1, sample_every=0, log=lambda msg: None)
        charrnn.train(str(base / "small.txt"), base / "run", **common, **TINY_KW)
        charrnn.train(str(base / "other.txt"), base / "other", **common, **{**TINY_KW, "hidden": 32, "arch": "lstm"})
    assert {p.name for p in (base / "run").iterdir()} >= set(RUN_FILES)
    return base


def fingerprint(run) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())
            if p.is_file() and p.name != ".lock"}


def one_line_error(code, err, *names):
    """Exit 2 and one line, `error: ...`, naming each of ``names``."""
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], err


def run_command(capsys, command, run, corpus, tmp, weights="best"):
    """``command`` on ``run``: (exit status, stderr).  `serve` is the loader `charrnn serve` starts with
    (charrnn.api.load), called in-process; a CharRNNError from it counts as the CLI's exit 2."""
    if command == "serve":
        try:
            charrnn.load(run, weights=weights)
        except CharRNNError as e:
            return 2, f"error: {e}\n"
        return 0, ""
    args = {
        "generate": ["generate", run, "--length", 5, "--seed", 1, "--weights", weights],
        "eval": ["eval", run, "--weights", weights, "--device", "cpu"],
        "export": ["export", run, "--out", tmp / "x.onnx", "--weights", weights],
        "resume": ["train", corpus, "--out", run, "--resume", "--max-steps", 3, "--sample-every", 0, "--quiet"],
        "report": ["report", run, "--out", tmp / "r.html", "--weights", weights],
    }[command]
    code, _, err = cli(capsys, *args)
    return code, err


@pytest.fixture
def copy(runs, tmp_path):
    """A fresh copy of the trained run, to damage."""
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    return run


# -- the damages ------------------------------------------------------------------------------------------


def _bytes(path, data: bytes):
    path.write_bytes(data)


def _json(path, edit):
    obj = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(edit(obj)), encoding="utf-8")


def _set(obj, keys, value):
    target = obj
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return obj


DAMAGES = {  # name -> fn(path, runs): the file at `path` damaged
    "truncated": lambda p, runs: _bytes(p, p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p, runs: _bytes(p, b""),
    "garbled": lambda p, runs: _bytes(p, random.Random(p.name).randbytes(max(p.stat().st_size, 64))),
    "foreign": lambda p, runs: shutil.copyfile(runs / "other" / p.name, p),
}
JSON_DAMAGES = {  # wrongly shaped but valid JSON
    "config.json": {
        "model-is-3": lambda c: _set(c, ["model"], 3),
        "hidden-is-big": lambda c: _set(c, ["model", "hidden"], "big"),
        "training-is-a-list": lambda c: _set(c, ["training"], []),
        "lr-is-fast": lambda c: _set(c, ["training", "lr"], "fast"),
        "corpus-is-5": lambda c: _set(c, ["corpus"], 5),
        "a-list": lambda c: [c],
    },
    "vocab.json": {
        "a-list": lambda v: [v["chars"]],
        "chars-is-5": lambda v: _set(v, ["chars"], 5),
        "unsorted": lambda v: _set(v, ["chars"], v["chars"][::-1]),
        "unk-id-3": lambda v: _set(v, ["unk_id"], 3),
    },
}
READERS = {  # which commands read which file (model.safetensors: with --weights latest)
    "config.json": COMMANDS, "vocab.json": COMMANDS,
    "best.safetensors": ("generate", "eval", "export", "report", "serve"),
    "model.safetensors": ("generate", "eval", "export", "report", "serve"),
    "trainer-state.pt": ("resume",),
}
FAST_DAMAGE = {"config.json": "garbled", "vocab.json": "garbled", "best.safetensors": "truncated",
               "model.safetensors": "foreign", "trainer-state.pt": "garbled"}


def _cases():
    for name, readers in READERS.items():
        damages = list(DAMAGES) + list(JSON_DAMAGES.get(name, {}))
        for damage in damages:
            for command in readers:
                fast = command == "generate" or (command in ("resume", "serve") or damage == FAST_DAMAGE[name]) \
                    and damage == FAST_DAMAGE[name]
                yield pytest.param(name, damage, command, id=f"{name}-{damage}-{command}",
                                   marks=() if fast else pytest.mark.slow)


@pytest.mark.probe("damaged-run-file")
@pytest.mark.parametrize("name,damage,command", list(_cases()))
def test_a_damaged_or_foreign_run_file_is_named_in_one_line(capsys, runs, copy, tmp_path, name, damage, command):
    path = copy / name
    if damage in DAMAGES:
        DAMAGES[damage](path, runs)
    else:
        _json(path, JSON_DAMAGES[name][damage])
    before = fingerprint(copy)
    weights = "latest" if name == "model.safetensors" else "best"
    code, err = run_command(capsys, command, copy, runs / "small.txt", tmp_path, weights)
    one_line_error(code, err, name)
    assert fingerprint(copy) == before                  # a refused command changes nothing in the run
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.probe("damaged-run-file")
@pytest.mark.parametrize("command", ["generate", "eval", "export", "report", "serve"])
def test_each_command_reads_an_undamaged_copy(capsys, runs, copy, tmp_path, command):
    """The control: the same commands on the undamaged copy succeed (so the refusals above are the files')."""
    code, err = run_command(capsys, command, copy, runs / "small.txt", tmp_path)
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.probe("damaged-run-file")
def test_resume_of_an_undamaged_copy_trains_on(capsys, runs, copy, tmp_path):
    code, err = run_command(capsys, "resume", copy, runs / "small.txt", tmp_path)
    assert code == 0, err


# -- trainer-state.pt holding a pickled payload -------------------------------------------------------------


class _Payload:
    def __init__(self, how, marker):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "open":
            return open, (self.marker, "w")
        return os.system, (f"touch {self.marker}",)


@pytest.mark.probe("pickle-payload")
@pytest.mark.parametrize("how", ["open", "os.system"])
@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_a_pickle_payload_in_trainer_state_is_never_run(capsys, runs, copy, tmp_path, how, container):
    marker = tmp_path / "marker"
    state = {"format_version": 1, "model": {}, "optimizer": {}, "step": _Payload(how, marker)}
    with open(copy / "trainer-state.pt", "wb") as f:
        if container == "torch.save":
            torch.save(state, f)
        else:
            pickle.dump(state, f)
    assert not marker.exists()
    before = fingerprint(copy)
    code, err = run_command(capsys, "resume", copy, runs / "small.txt", tmp_path)
    one_line_error(code, err, "trainer-state.pt")
    assert not marker.exists()
    assert fingerprint(copy) == before


@pytest.mark.probe("pickle-payload")
@pytest.mark.parametrize("edit", ["a-list", "step-is-text", "model-of-floats", "optimizer-of-sgd"])
def test_a_trainer_state_of_the_wrong_shape_is_refused_before_resume_writes(capsys, runs, copy, tmp_path, edit):
    state = torch.load(copy / "trainer-state.pt", weights_only=True)
    state = {"a-list": lambda s: [1, 2],
             "step-is-text": lambda s: {**s, "step": "many"},
             "model-of-floats": lambda s: {**s, "model": {k: 1.0 for k in s["model"]}},
             "optimizer-of-sgd": lambda s: {**s, "optimizer": _sgd_state(s["model"])}}[edit](state)
    torch.save(state, copy / "trainer-state.pt")
    before = fingerprint(copy)
    code, err = run_command(capsys, "resume", copy, runs / "small.txt", tmp_path)
    one_line_error(code, err, "trainer-state.pt")
    assert fingerprint(copy) == before


def _sgd_state(weights: dict) -> dict:
    params = [torch.nn.Parameter(t.clone()) for t in weights.values()]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(p.sum() for p in params).backward()
    sgd.step()
    return sgd.state_dict()


# -- metrics.jsonl ------------------------------------------------------------------------------------------


@pytest.mark.probe("metrics-lines")
@pytest.mark.parametrize("command", [pytest.param("resume", marks=pytest.mark.slow), "report", "plot"])
def test_a_line_torn_by_a_kill_is_dropped_and_garbage_refused(capsys, runs, copy, tmp_path, command):
    metrics = copy / "metrics.jsonl"
    good = metrics.read_text(encoding="utf-8")
    assert good.count("\n") >= 3

    def attempt():
        if command == "plot":
            code, _, err = cli(capsys, "plot", copy, "--out", tmp_path / "p.png", "--force")
            return code, err
        if command == "report":
            (tmp_path / "r.html").unlink(missing_ok=True)
        return run_command(capsys, command, copy, runs / "small.txt", tmp_path)

    metrics.write_text(good + '{"step": 3, "epoch": 0, "ti', encoding="utf-8")      # torn by a kill
    code, err = attempt()
    assert code == 0 and "Traceback" not in err, err
    if command == "resume":                             # rewritten without the torn line
        assert all(json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines())
    for garbage in ['{"step": 1, "ti\n', "\x00\xff garbage\n", "3\n", '{"step": "one", "time": 1}\n']:
        metrics.write_text(good.replace("\n", "\n" + garbage, 1), encoding="latin-1")
        before = fingerprint(copy)
        code, err = attempt()
        one_line_error(code, err, "metrics.jsonl", "line 2")
        assert fingerprint(copy) == before


# -- a damaged report sample ------------------------------------------------------------------------------


@pytest.mark.probe("damaged-run-file")
def test_report_shows_undecodable_samples_instead_of_failing(capsys, runs, copy, tmp_path):
    (copy / "samples").mkdir()
    (copy / "samples" / "step0000002-t1.0.txt").write_bytes(b"\xff\xfe ok")
    (copy / "samples" / "step0000002-t1.2.3.txt").write_text("odd name")
    code, err = run_command(capsys, "report", copy, runs / "small.txt", tmp_path)
    assert code == 0, err
    assert "ok" in (tmp_path / "r.html").read_text(encoding="utf-8")


# -- the encoded-corpus cache -----------------------------------------------------------------------------


CACHE_DAMAGES = {
    "meta-garbled": lambda c: (c / "meta.json").write_bytes(b"\x00{not json"),
    "meta-emptied": lambda c: (c / "meta.json").write_bytes(b""),
    "meta-chars-of-another-corpus": lambda c: _json(c / "meta.json", lambda m: _set(m, ["chars"], "ab")),
    "ids-truncated": lambda c: (c / "ids.npy").write_bytes((c / "ids.npy").read_bytes()[:200]),
    "ids-emptied": lambda c: (c / "ids.npy").write_bytes(b""),
    "ids-garbled": lambda c: (c / "ids.npy").write_bytes(random.Random(0).randbytes(500)),
    "ids-out-of-range": lambda c: np.save(c / "ids.npy", np.full(20_000, 250, dtype=np.uint8)),
    "ids-missing": lambda c: (c / "ids.npy").unlink(),
}


@pytest.mark.probe("corpus-cache")
@pytest.mark.parametrize("damage", list(CACHE_DAMAGES))
def test_a_damaged_corpus_cache_is_encoded_again(charrnn_home, tmp_path, damage):
    from charrnn.corpus import load_corpus

    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    fresh = load_corpus(str(corpus), progress=False)
    ids, chars, sha256 = np.array(fresh.ids), fresh.vocab.chars, fresh.sha256   # copied: the map is damaged next
    del fresh
    (cache,) = (charrnn_home / "encoded").iterdir()
    CACHE_DAMAGES[damage](cache)
    again = load_corpus(str(corpus), progress=False)
    assert np.array_equal(again.ids, ids) and again.vocab.chars == chars and again.sha256 == sha256
    assert sorted(p.name for p in cache.iterdir()) == ["ids.npy", "meta.json"]     # no temporary file left


@pytest.mark.slow
@pytest.mark.probe("corpus-cache")
def test_eval_rebuilds_a_damaged_cache_and_reports_the_same_loss(capsys, runs, copy, charrnn_home):
    code, first, err = cli(capsys, "eval", copy, "--json", "--device", "cpu")
    assert code == 0, err
    for cache in (charrnn_home / "encoded").iterdir():
        (cache / "ids.npy").write_bytes(b"\x93NUMPY garbage")
    code, second, err = cli(capsys, "eval", copy, "--json", "--device", "cpu")
    assert code == 0 and "Traceback" not in err, err
    assert json.loads(second) == json.loads(first)


# -- seeds -----------------------------------------------------------------------------------------------


@pytest.mark.probe("seed-range")
@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", str(2**63)])
def test_a_seed_out_of_range_is_refused_in_one_line(capsys, runs, seed):
    code, _, err = cli(capsys, "generate", runs / "run", "--length", 5, "--seed", seed)
    one_line_error(code, err, "--seed", "2**63")


@pytest.mark.probe("seed-range")
def test_train_refuses_a_seed_out_of_range_before_it_starts(capsys, runs, tmp_path):
    code, _, err = cli(capsys, "train", runs / "small.txt", "--out", tmp_path / "new", "--seed",
                       "99999999999999999999999", "--quiet")
    one_line_error(code, err, "--seed", "2**63")
    assert not (tmp_path / "new").exists()


@pytest.mark.probe("seed-range")
def test_the_largest_seed_generates(capsys, runs):
    code, out, err = cli(capsys, "generate", runs / "run", "--length", 5, "--seed", 2**63 - 1)
    assert code == 0, err


# -- exported .onnx files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_file(runs):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from charrnn.export import export_onnx

    path = runs / "run.onnx"
    if not path.exists():
        export_onnx(runs / "run", path)
        export_onnx(runs / "other", runs / "other.onnx")
    return path


@pytest.mark.probe("seed-range")
@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999"])
def test_onnx_generation_refuses_a_seed_out_of_range(capsys, onnx_file, seed):
    code, _, err = cli(capsys, "generate", onnx_file, "--length", 5, "--seed", seed)
    one_line_error(code, err, "--seed")
    code, out, err = cli(capsys, "generate", onnx_file, "--length", 5, "--seed", 0)
    assert code == 0, err


def _with_metadata(src, dst, **changes):
    import onnx

    proto = onnx.load(src)
    for entry in proto.metadata_props:
        if entry.key in changes:
            entry.value = changes[entry.key]
    onnx.save(proto, dst)
    return dst


def _other_metadata(onnx_file, key):
    import onnx

    return {e.key: e.value for e in onnx.load(onnx_file.parent / "other.onnx").metadata_props}[key]


@pytest.mark.probe("onnx-metadata")
@pytest.mark.parametrize("key,value", [
    ("charrnn.vocab", "other"),                          # another run's vocabulary (another size)
    ("charrnn.model", "other"),                          # another run's model (LSTM 32)
    ("charrnn.vocab", '{"chars": 5}'),
    ("charrnn.model", "[1, 2"),
    ("charrnn.sampling", '{"temperature": "hot"}'),
    ("charrnn.sampling", "3"),
])
def test_onnx_metadata_that_does_not_match_its_graph_is_refused(capsys, onnx_file, tmp_path, key, value):
    value = _other_metadata(onnx_file, key) if value == "other" else value
    bad = _with_metadata(onnx_file, tmp_path / "bad.onnx", **{key: value})
    code, out, err = cli(capsys, "generate", bad, "--length", 5, "--seed", 1)
    one_line_error(code, err, str(bad))
    assert out == ""


@pytest.mark.probe("onnx-metadata")
@pytest.mark.parametrize("damage", ["truncated", "emptied", "garbled"])
def test_a_damaged_onnx_file_is_refused(capsys, onnx_file, tmp_path, damage):
    bad = tmp_path / "bad.onnx"
    shutil.copyfile(onnx_file, bad)
    DAMAGES[damage](bad, None)
    code, _, err = cli(capsys, "generate", bad, "--length", 5)
    one_line_error(code, err, str(bad))
