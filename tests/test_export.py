"""Export to ONNX and the torch-free runtime: the exported step against the PyTorch model, sampling
semantics, the command line end to end, torch never imported, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import charrnn
from charrnn import checkpoint as ckpt
from charrnn import runtime
from charrnn.errors import CharRNNError
from charrnn.export import export_onnx
from charrnn.models import CharLM, ModelConfig
from charrnn.decoding import process_logits
from charrnn.sampling import Sampler
from charrnn.vocab import UNK_ID, Vocab

from .conftest import TINY_KW, cli, make_text

VOCAB = Vocab.from_text(make_text(5_000))
PROMPT_200 = make_text(200, seed=7)


def random_run(path: Path, seed: int = 0, **model_kw) -> CharLM:
    """A randomly initialised CharLM saved as a run directory (what `charrnn export` reads)."""
    torch.manual_seed(seed)
    model = CharLM(ModelConfig(len(VOCAB), **model_kw)).eval()
    path.mkdir(parents=True)
    ckpt.write_config(path, {"model": model.config.to_dict(), "corpus": {"name": "test", "lowercase": False}})
    VOCAB.save(path / ckpt.VOCAB)
    ckpt.save_weights(path / ckpt.LATEST, model, 0)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained a few dozen steps (confident predictions), and its export."""
    tmp = tmp_path_factory.mktemp("export")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    charrnn.train(str(corpus), tmp / "run", max_steps=40, lr=3e-3, progress=False, log=lambda m: None,
                  **TINY_KW)
    onnx_file = tmp / "model.onnx"
    export_onnx(tmp / "run", onnx_file)
    return tmp / "run", onnx_file


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("layers,embed", [(1, 16), (2, 16), (2, 0)])
def test_exported_logits_match_pytorch_over_a_200_character_prompt(tmp_path, arch, layers, embed):
    model = random_run(tmp_path / "run", arch=arch, layers=layers, embed=embed, hidden=48)
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    lm = runtime.load(tmp_path / "m.onnx")
    ids = torch.from_numpy(VOCAB.encode(PROMPT_200).astype(np.int64))[None]
    with torch.no_grad():
        want, want_state = model(ids)
    got = lm.logits(PROMPT_200)
    assert got.shape == (200, len(VOCAB))
    assert np.abs(got - want[0].numpy()).max() < 1e-4
    # The state after the prompt too (batched: the same prompt twice).
    _, state = lm.prime([PROMPT_200, PROMPT_200])
    want_state = want_state if arch == "lstm" else (want_state,)
    assert len(state) == len(want_state)
    for got_s, want_s in zip(state, want_state):
        assert got_s.shape == (layers, 2, 48)
        assert np.abs(got_s - want_s.numpy()).max() < 1e-4


def test_metadata_holds_vocab_config_and_sampling_defaults(trained, tmp_path):
    run, onnx_file = trained
    proto = onnx.load(onnx_file)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["charrnn.vocab"])["chars"] == "".join(Vocab.load(run / "vocab.json").chars)
    assert json.loads(meta["charrnn.vocab"])["unk_id"] == UNK_ID
    assert json.loads(meta["charrnn.model"]) == ckpt.read_config(run)["model"]
    assert json.loads(meta["charrnn.sampling"]) == {"temperature": 1.0, "top_k": None, "top_p": None}
    assert meta["charrnn.version"] == charrnn.__version__ and meta["charrnn.format_version"] == "1"
    assert [i.name for i in proto.graph.input] == ["ids", "h"]
    assert [o.name for o in proto.graph.output] == ["logits", "h_out"]
    # The runtime reads the defaults from the file: a file whose default temperature is 0 is greedy.
    for p in proto.metadata_props:
        if p.key == "charrnn.sampling":
            p.value = json.dumps({"temperature": 0.0, "top_k": None, "top_p": None})
    greedy_file = tmp_path / "greedy.onnx"
    onnx.save(proto, greedy_file)
    lm = runtime.load(greedy_file)
    assert lm.generate("the ", 50, seed=1) == lm.generate("the ", 50, seed=2) == lm.generate("the ", 50, temperature=0)


def test_greedy_text_is_the_same_as_charrnn_generate(capsys, trained):
    run, onnx_file = trained
    for prompt in ("the ", "ROMEO: what"):
        code, want, _ = cli(capsys, "generate", run, "--prompt", prompt, "--length", "300", "--temperature", "0")
        assert code == 0
        code, got, _ = cli(capsys, "generate", onnx_file, "--prompt", prompt, "--length", "300", "--temperature", "0")
        assert code == 0 and got == want and len(got) == len(prompt) + 300 + 1
    # Many samples of different prompts in one batch, and the empty prompt (starts after a newline).
    lm, torch_lm = runtime.load(onnx_file), charrnn.load(run)
    prompts = ["a ", "the quick", "\n"]
    assert lm.generate(prompts, 80, temperature=0) == torch_lm.generate(prompts, 80, temperature=0)
    assert lm.generate("", 40, temperature=0) == torch_lm.generate("", 40, temperature=0)


def test_sampling_is_reproducible_batched_and_filtered(trained, monkeypatch):
    _, onnx_file = trained
    lm = runtime.load(onnx_file)
    a = lm.generate("the ", 100, num_samples=3, seed=5, temperature=0.9)
    assert a == lm.generate("the ", 100, num_samples=3, seed=5, temperature=0.9)
    assert a != lm.generate("the ", 100, num_samples=3, seed=6, temperature=0.9)
    assert len(set(a)) == 3 and all(len(s) == 104 and s.startswith("the ") for s in a)
    assert lm.generate("the ", 60, top_k=1, seed=3) == lm.generate("the ", 60, temperature=0)
    assert lm.generate("the ", 60, top_p=1e-6, seed=3) == lm.generate("the ", 60, temperature=0)
    # One batched step per character for all samples.
    batches = []
    step = runtime.ExportedModel.step

    def spy(self, ids, state):
        batches.append(len(ids))
        return step(self, ids, state)

    monkeypatch.setattr(runtime.ExportedModel, "step", spy)
    lm.generate("ab", 10, num_samples=4, seed=0)
    assert batches == [1, 1] + [4] * 9  # the prompt once at batch 1, then 9 steps of all samples


def test_logits_processing_matches_the_pytorch_sampler():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 30)).astype(np.float32) * 3
    logits[3, UNK_ID] = 50.0  # [UNK] most likely: still removed
    for opts in [dict(), dict(top_k=5), dict(top_p=0.6), dict(top_k=10, top_p=0.8), dict(temperature=0.5, top_k=3)]:
        t = opts.pop("temperature", 1.0)
        want = process_logits(torch.from_numpy(logits.copy()), t, **opts).numpy()
        got = runtime.process_logits(logits, t, **opts)
        assert (np.isfinite(got) == np.isfinite(want)).all(), opts
        assert np.allclose(got[np.isfinite(got)], want[np.isfinite(want)], atol=1e-5)
    # Sampled frequencies follow the filtered distribution; [UNK] is never chosen.
    probs = np.array([[0.0, 0.6, 0.3, 0.1, 0.0]])
    with np.errstate(divide="ignore"):
        many = np.repeat(np.log(probs + np.array([[0.5, 0, 0, 0, 0]])), 20_000, axis=0)  # [UNK] has 0.5
    picks = runtime.choose(many, 1.0, None, 0.85, np.random.default_rng(1))  # top-p keeps ids 1, 2
    assert set(np.unique(picks)) == {1, 2}
    assert abs((picks == 1).mean() - 2 / 3) < 0.02
    assert (runtime.choose(many[:3], 0, None, None, None) == 1).all()


def test_repetition_penalty_is_the_pytorch_samplers(trained):
    from charrnn.decoding import penalize

    rng = np.random.default_rng(0)
    logits, seen = rng.normal(size=(4, 30)).astype(np.float32) * 3, rng.random((4, 30)) < 0.3
    want = penalize(torch.from_numpy(logits), torch.from_numpy(seen), 1.8).numpy()
    assert np.allclose(runtime.penalize(logits, seen, 1.8), want)
    run, onnx_file = trained
    lm, torch_lm = runtime.load(onnx_file), charrnn.load(run)
    assert (lm.generate("the ", 80, temperature=0, repetition_penalty=1.6)
            == torch_lm.generate("the ", 80, temperature=0, repetition_penalty=1.6)
            != torch_lm.generate("the ", 80, temperature=0))


def test_int8_export_is_smaller_and_close(tmp_path):
    model = random_run(tmp_path / "run", hidden=128, embed=16)
    r = export_onnx(tmp_path / "run", tmp_path / "int8.onnx", int8=True)
    fp32 = export_onnx(tmp_path / "run", tmp_path / "fp32.onnx")
    assert r.weights == "int8" and r.bytes < 0.5 * fp32.bytes
    lm = runtime.load(tmp_path / "int8.onnx")
    assert lm.weights == "int8"
    with torch.no_grad():
        want = model(torch.from_numpy(VOCAB.encode(PROMPT_200).astype(np.int64))[None])[0][0].numpy()
    got = lm.logits(PROMPT_200)
    # Within 5% of the logits' scale (full-range int8 weights saturate on AVX2 CPUs: 27% off).
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


TORCH_BLOCKED = "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError


def test_runtime_and_generate_from_onnx_never_import_torch(trained):
    run, onnx_file = trained
    code = TORCH_BLOCKED + (
        "import charrnn, charrnn.runtime as rt\n"
        f"lm = rt.load({str(onnx_file)!r})\n"
        "print(lm.generate('the ', 50, num_samples=2, seed=4, top_k=5)[1])\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == runtime.load(onnx_file).generate("the ", 50, num_samples=2, seed=4, top_k=5)[1] + "\n"
    # The command line too: `python -m charrnn generate FILE.onnx`.
    code = TORCH_BLOCKED + (
        "import runpy\n"
        f"sys.argv = ['charrnn', 'generate', {str(onnx_file)!r}, '--prompt', 'a ', '--length', '30', '--seed', '1']\n"
        "runpy.run_module('charrnn', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == runtime.load(onnx_file).generate("a ", 30, seed=1)[0] + "\n"
    # And the guard is real: the PyTorch path stops, with one line saying what to install.
    code = TORCH_BLOCKED + (
        "from charrnn.cli import main\n"
        f"sys.exit(main(['generate', {str(run)!r}, '--length', '5']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: this command needs torch") and r.stdout == ""


def test_cli_export_then_generate_end_to_end(capsys, trained, tmp_path):
    run, _ = trained
    out = tmp_path / "shk.onnx"
    code, _, err = cli(capsys, "export", run, "--format", "onnx", "--out", out, "--weights", "latest")
    assert code == 0 and out.is_file() and f"charrnn generate {out}" in err
    before = out.read_bytes()
    code, _, err = cli(capsys, "export", run, "--out", out)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    code, _, err = cli(capsys, "export", run, "--out", out, "--force", "--int8")
    assert code == 0 and out.read_bytes() != before and "int8" in err
    code, _, err = cli(capsys, "export", run, "--out", out, "--force", "--weights", "latest")
    assert code == 0 and out.read_bytes() == before  # deterministic
    # generate FILE.onnx: streamed single sample, JSON samples, unknown characters warned about once.
    code, text, _ = cli(capsys, "generate", out, "--prompt", "the ", "--length", "50", "--seed", "2",
                        "--temperature", "0.8", "--top-k", "10", "--top-p", "0.95")
    assert code == 0 and text.startswith("the ") and len(text) == 4 + 50 + 1
    code, text2, _ = cli(capsys, "generate", out, "--prompt", "the ", "--length", "50", "--seed", "2",
                         "--temperature", "0.8", "--top-k", "10", "--top-p", "0.95")
    assert text2 == text
    code, js, err = cli(capsys, "generate", out, "--prompt", "Zé ", "--length", "20", "--num-samples", "3", "--json")
    samples = json.loads(js)["samples"]
    assert code == 0 and len(samples) == 3 and all(len(s) == 23 and s.startswith("Zé ") for s in samples)
    assert err.count("warning:") == 1 and "'é'" in err and "'Z'" in err
    code, many, _ = cli(capsys, "generate", out, "--length", "20", "--num-samples", "2", "--seed", "1")
    assert code == 0 and many.count("-" * 72) == 1


def test_bad_export_and_runtime_input(capsys, trained, tmp_path):
    run, onnx_file = trained

    def one_line_error(*args, expect):
        code, _, err = cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], err

    one_line_error("export", tmp_path / "missing", "--out", tmp_path / "a.onnx", expect="does not exist")
    one_line_error("export", run, "--out", onnx_file, expect="already exists")
    one_line_error("export", run, "--format", "tflite", "--out", tmp_path / "a.onnx", expect="invalid choice")
    one_line_error("export", run, "--out", tmp_path / "a.bin", expect="must end in .onnx")
    one_line_error("export", run, "--out", tmp_path / "no" / "a.onnx", expect="does not exist")
    one_line_error("export", run, expect="--out")
    assert not (tmp_path / "a.onnx").exists()
    not_onnx = tmp_path / "notes.txt"
    not_onnx.write_text("hello")
    one_line_error("generate", not_onnx, expect="not a run directory")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a model")
    one_line_error("generate", garbage, expect="cannot be loaded by onnxruntime")
    one_line_error("generate", tmp_path / "missing.onnx", expect="does not exist")
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX model that charrnn did not write
    proto = onnx.load(onnx_file)
    del proto.metadata_props[:]
    onnx.save(proto, foreign)
    one_line_error("generate", foreign, expect="not a charrnn export")
    one_line_error("generate", onnx_file, "--beam-width", "3", expect="--beam-width")
    one_line_error("generate", onnx_file, "--int8", expect="--int8")
    one_line_error("generate", onnx_file, "--temperature", "-1", expect="--temperature")
    one_line_error("generate", onnx_file, "--top-p", "2", expect="--top-p")
    with pytest.raises(CharRNNError, match="^num_samples"):  # the API names the field, the CLI the flag
        runtime.load(onnx_file).generate("a", 5, num_samples=0)


def test_parser_needs_no_torch_and_lazy_package_attributes():
    from charrnn.models.seq2seq import KINDS
    from charrnn.tasks.cli import DATE_MODELS

    assert DATE_MODELS == KINDS
    assert charrnn.load is charrnn.api.load and charrnn.LanguageModel is charrnn.api.LanguageModel
    code = TORCH_BLOCKED + ("from charrnn.cli import build_parser\n"
                            "build_parser().parse_args(['train', 'x', '--out', 'y'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_pytorch_sampler_and_runtime_agree_on_the_default_model_shape(tmp_path):
    """The default architecture (embedding 256 -> GRU, here narrower) exports and generates greedily alike."""
    model = random_run(tmp_path / "run", seed=3, hidden=256)
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    lm = runtime.load(tmp_path / "m.onnx")
    sampler = Sampler(model, VOCAB)
    assert lm.generate("to be", 100, temperature=0) == sampler.generate("to be", 100, temperature=0)
