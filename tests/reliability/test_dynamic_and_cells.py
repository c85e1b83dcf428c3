"""Dynamic evaluation, --adapt, the min cells under bf16 and sampling's edge cases, as a hostile user tries them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import charrnn

from ..conftest import TINY, cli, make_text, running, train_tiny_run
from .test_options import deadline

# The tiny run's training split is 18,000 characters: 16 segments of at most 1,124 each.
MOST_SEGMENT = 1124


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "dynamic-cells", max_steps=2)


def one_error(code: int, err: str) -> str:
    """The one `error:` line a refusal printed (exit status 2, nothing else, no traceback)."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------- dynamic evaluation's segment


@pytest.mark.probe("dynamic-segment")
@pytest.mark.parametrize("segment", [100_000, 17_999, MOST_SEGMENT + 1])
def test_a_segment_longer_than_the_training_split_holds_is_refused_before_any_work(capsys, run_dir, segment):
    """At or past the split it was a ValueError; just below it, minutes of work on 20,000 characters."""
    for command in (["eval", run_dir, "--dynamic"], ["generate", run_dir, "--adapt", run_dir / "config.json"]):
        with deadline(20):
            code, _, err = cli(capsys, *command, "--dynamic-segment", segment)
        assert one_error(code, err) == (f"error: --dynamic-segment must be at most {MOST_SEGMENT:,} for this run: the "
                                        "step sizes are measured on 16 segments of its training split (18,000 ids) "
                                        f"at a time; got {segment:,}")


@pytest.mark.probe("dynamic-segment")
def test_a_segment_past_the_memory_here_is_refused_before_any_work(capsys, run_dir, monkeypatch):
    monkeypatch.setattr("charrnn.hardware.memory_bytes", lambda device: 16 << 30)   # the same verdict anywhere
    with deadline(20):
        code, _, err = cli(capsys, "eval", run_dir, "--dynamic", "--dynamic-segment", 10**12)
    line = one_error(code, err)
    assert line.startswith("error: --dynamic-segment is 1,000,000,000,000: that needs about ") and \
        line.endswith("more than the 16.0 GiB of memory here; ask for less"), line


@pytest.mark.probe("dynamic-segment")
def test_the_largest_segment_allowed_is_measured():
    import numpy as np

    from charrnn.dynamic import gradient_rms
    from charrnn.errors import OptionError
    from charrnn.models import CharLM, ModelConfig

    model = CharLM(ModelConfig(vocab_size=20, hidden=8, embed=4))
    train = np.arange(161) % 20                          # 16 segments of 10 and one id more
    with pytest.raises(OptionError, match=r"^dynamic_segment must be at most 10 for this run: .* got 11$"):
        gradient_rms(model, train, 11)
    rms = gradient_rms(model, train, 10)
    assert rms.keys() == dict(model.named_parameters()).keys() and all(bool((r > 0).any()) for r in rms.values())


# --------------------------------------------------------------------------- generate --adapt FILE


@pytest.mark.probe("adapt-file")
@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "missing"])
def test_adapt_reads_regular_files_only(capsys, run_dir, tmp_path, kind):
    """A FIFO blocked forever and /dev/zero grew until MemoryError (the slow test below); each is refused
    without being opened, as a corpus is."""
    path = {"fifo": tmp_path / "fifo", "device": "/dev/null", "directory": tmp_path, "missing": tmp_path / "no"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with deadline(20):
        code, _, err = cli(capsys, "generate", run_dir, "--adapt", path, "--length", 5)
    what = {"fifo": "is a FIFO, not a regular file", "device": "is a device, not a regular file",
            "directory": "is a directory, not a regular file", "missing": ": no such file"}[kind]
    assert one_error(code, err) == f"error: --adapt {path}{'' if kind == 'missing' else ' '}{what}; give a UTF-8 " \
                                   "text file"


@pytest.mark.slow
@pytest.mark.probe("adapt-file")
def test_adapt_never_reads_an_endless_device(run_dir):
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))"
    proc = subprocess.run([sys.executable, "-c", f"{limit}; import sys; from charrnn.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "generate", str(run_dir), "--adapt", "/dev/zero"],
                          capture_output=True, text=True, timeout=300)
    assert one_error(proc.returncode, proc.stderr) == ("error: --adapt /dev/zero is a device, not a regular file; "
                                                       "give a UTF-8 text file")


@pytest.mark.probe("adapt-file")
def test_adapting_to_a_text_the_model_knows_nothing_of_warns(capsys, run_dir, tmp_path):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("日本語の文章です。" * 20, encoding="utf-8")
    code, out, err = cli(capsys, "generate", run_dir, "--adapt", foreign, "--length", 5, "--seed", 1,
                         "--dynamic-segment", 5)
    assert code == 0 and err.splitlines()[0] == (f"warning: no character of --adapt {foreign} is in the model's "
                                                 "vocabulary (all are read as [UNK]): the model learns nothing from "
                                                 "it about what to write"), err


@pytest.mark.probe("adapt-file")
def test_adapting_to_a_text_that_takes_a_while_shows_progress(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("charrnn.dynamic.PROGRESS_AFTER", 0, raising=False)   # every text "takes a while"
    style = tmp_path / "style.txt"
    style.write_text(make_text(300, seed=3), encoding="utf-8")
    code, _, err = cli(capsys, "generate", run_dir, "--adapt", style, "--length", 5, "--seed", 1,
                       "--dynamic-segment", 5)
    assert code == 0 and "adapting: 100%" in err and "299/299" in err, err


# --------------------------------------------------------------------------- minGRU / minLSTM under bf16


@pytest.mark.probe("min-cells-bf16")
@pytest.mark.parametrize("mode", ["mingru", "minlstm"])
def test_the_scan_under_bf16_autocast_is_the_step_by_step_recurrence_over_1000_steps(mode):
    """In bf16 the scan's error grew with the position: 16% at step 100, over 100% by step 1000."""
    import torch.nn.functional as F

    from charrnn.models.minrnn import MinRNN, step

    torch.manual_seed(0)
    rnn = MinRNN(mode, 16, 32)
    x = torch.randn(2, 1000, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, h_n = rnn(x)
        gi = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0).float()      # what the layer reads, in bf16
    h, ref = torch.zeros(2, 32), []
    for t in range(x.shape[1]):
        h = step(mode, gi[:, t], h)
        ref.append(h)
    ref = torch.stack(ref, 1)
    error = ((y.float() - ref).abs() / ref.abs()).amax()
    assert error < 1e-3, f"relative error {float(error):.3g}"
    assert torch.equal(h_n[0], y[:, -1])


@pytest.mark.slow
@pytest.mark.probe("min-cells-bf16")
@pytest.mark.parametrize("arch", ["mingru", "minlstm"])
def test_a_min_cells_validation_loss_under_bf16_is_what_eval_gives(tmp_path, arch):
    """Training validates under bf16 autocast, `charrnn eval` in fp32: the same model, the same text, so the
    same loss up to bf16's matrix products (it was 3.33 against 3.22 with sequences of 1,000)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    result = charrnn.train(str(corpus), tmp_path / "run", arch=arch, hidden=48, embed=16, seq_len=1000,
                           batch_size=8, lr=3e-3, precision="bf16", max_steps=10, eval_streams=1, sample_every=0,
                           progress=False, log=lambda m: None)
    evaluated = charrnn.load(tmp_path / "run").evaluate()["loss"]
    assert abs(result.best_val_loss - evaluated) < 1.5e-3, (result.best_val_loss, evaluated)


# --------------------------------------------------------------------------- temperatures past float32


@pytest.fixture(scope="module")
def lm(run_dir):
    return charrnn.load(run_dir)


@pytest.fixture(scope="module")
def onnx_file(run_dir, tmp_path_factory):
    from charrnn.export import export_onnx

    return export_onnx(run_dir, tmp_path_factory.mktemp("onnx") / "run.onnx").path


HOT = "error: --temperature must be >= 0 (0 means greedy) and at most 1e38, got "


@pytest.mark.probe("huge-temperature")
@pytest.mark.parametrize("temperature", ["1e39", "inf"])
def test_a_temperature_past_float32_is_refused_on_the_command_line(capsys, run_dir, onnx_file, tmp_path,
                                                                  temperature):
    """logits / 1e39 in float32 turned the banned ids' -inf into NaN: every sample collapsed onto one id."""
    for model in (run_dir, onnx_file):
        code, _, err = cli(capsys, "generate", model, "--temperature", temperature, "--length", 20, "--seed", 1)
        assert one_error(code, err) == HOT + f"{float(temperature)}"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(5_000), encoding="utf-8")
    code, _, err = cli(capsys, "train", corpus, "--out", tmp_path / "run", *TINY, "--sample-temperatures",
                       f"1,{temperature}")
    assert one_error(code, err) == ("error: --sample-temperatures must be numbers >= 0 (0 is greedy) and at most "
                                    f"1e38, got [1.0, {float(temperature)}]")
    assert not (tmp_path / "run").exists()
    code, _, err = cli(capsys, "generate", run_dir, "--temperature", "1e38", "--length", 20, "--seed", 1)
    assert code == 0, err


@pytest.mark.probe("huge-temperature")
def test_a_temperature_past_float32_is_refused_by_the_library_and_the_api(lm):
    with pytest.raises(charrnn.CharRNNError, match=r"^temperature must be >= 0 \(0 means greedy\) and at most 1e38"):
        lm.generate("the ", 20, temperature=1e39)
    import httpx

    from charrnn.serve import Limits, create_app

    with running(create_app(lm, Limits())) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path, body in (("/v1/generate", {"prompt": "the ", "length": 20}),
                           ("/v1/completions", {"prompt": "the ", "max_tokens": 20})):
            r = client.post(path, json={**body, "temperature": 1e39})
            assert r.status_code in (400, 422) and "temperature" in r.text, (path, r.status_code, r.text)


# --------------------------------------------------------------------------- beams, .onnx --json, weight files


@pytest.mark.probe("beam-length")
@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_every_beam_has_the_length_asked_for(kind):
    """The beams ran as many tokens as the greedy text needed for the length, and spelt fewer characters."""
    from charrnn.models import CharLM, ModelConfig
    from charrnn.sampling import Sampler
    from charrnn.tokens import TokenVocab

    vocab = TokenVocab.train(kind, make_text(5_000), 200)
    torch.manual_seed(0)
    sampler = Sampler(CharLM(ModelConfig(vocab_size=len(vocab), hidden=16, embed=8)), vocab)
    for length in (7, 25):
        beams = sampler.beam("the ", length, 4)
        assert len(beams) == 4 and [len(t) for t, _ in beams] == [4 + length] * 4, (length, beams)


@pytest.mark.probe("onnx-finish-reasons")
def test_an_exported_files_json_has_finish_reasons_as_a_runs_has(capsys, run_dir, onnx_file):
    answers = []
    for model in (run_dir, onnx_file):
        code, out, err = cli(capsys, "generate", model, "--json", "--num-samples", 2, "--length", 10, "--seed", 1)
        assert code == 0, err
        answers.append(json.loads(out))
    assert answers[0].keys() == answers[1].keys() and answers[1]["finish_reasons"] == ["length", "length"]


@pytest.mark.probe("weights-bytes")
def test_the_same_weights_are_the_same_bytes(tmp_path):
    """safetensors writes its metadata in a random order: two identical runs differed in model.safetensors."""
    from safetensors.torch import load_file

    from charrnn.checkpoint import save_weights
    from charrnn.models import CharLM, ModelConfig

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=20, hidden=8, embed=4))
    files = [tmp_path / f"{i}.safetensors" for i in range(20)]
    for path in files:
        save_weights(path, model, step=7)
    assert len({path.read_bytes() for path in files}) == 1
    data = files[0].read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"].items()) == [("format", "pt"), ("step", "7")]
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in load_file(files[0]).items())
