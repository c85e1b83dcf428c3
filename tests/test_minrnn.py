"""minGRU / minLSTM: the parallel scan equals the step-by-step reference; the cells train, sample and export."""

import math

import pytest
import torch

from charrnn.errors import CharRNNError
from charrnn.models import CharLM, ModelConfig
from charrnn.models.minrnn import MinRNN, step
from charrnn.stepper import Stepper

MODES = ["mingru", "minlstm"]


def sequential(rnn: MinRNN, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step at a time, layer after layer."""
    finals = []
    for i in range(rnn.num_layers):
        gi = torch.nn.functional.linear(x, getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"bias_ih_l{i}"))
        h = torch.zeros(x.shape[0], rnn.hidden_size, dtype=x.dtype) if h0 is None else h0[i]
        outs = []
        for t in range(x.shape[1]):
            h = step(rnn.mode, gi[:, t], h)
            outs.append(h)
        x = torch.stack(outs, 1)
        finals.append(h)
    return x, torch.stack(finals)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_state", [False, True])
def test_the_parallel_scan_is_the_sequential_recurrence(mode, dtype, tol, with_state):
    torch.manual_seed(0)
    rnn = MinRNN(mode, 7, 12, num_layers=2).to(dtype)
    x = torch.randn(3, 40, 7, dtype=dtype, requires_grad=True)
    h0 = torch.rand(2, 3, 12, dtype=dtype) + 0.1 if with_state else None
    y, hn = rnn(x, h0)
    y_ref, hn_ref = sequential(rnn, x, h0)
    assert torch.allclose(y, y_ref, atol=tol, rtol=tol) and torch.allclose(hn, hn_ref, atol=tol, rtol=tol)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, *rnn.parameters()])
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x, *rnn.parameters()])
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=10 * tol * (1 + float(b.abs().max())), rtol=10 * tol)


@pytest.mark.parametrize("mode", MODES)
def test_the_sampling_step_is_the_model(mode):
    torch.manual_seed(1)
    model = CharLM(ModelConfig(vocab_size=20, embed=8, hidden=16, layers=2, arch=mode)).eval()
    assert model.num_parameters() == model.config.num_parameters()
    ids = torch.randint(1, 20, (2, 30))
    with torch.no_grad():
        logits, _ = model(ids)
        stepper, state = Stepper(model), [torch.zeros(2, 16) for _ in range(2)]
        assert stepper.backend == "python"
        for t in range(30):
            out, state = stepper.step(ids[:, t], state)
            assert torch.allclose(out, logits[:, t], atol=1e-5)


def test_weight_drop_is_refused_for_input_only_gates():
    with pytest.raises(CharRNNError, match="weight_drop drops recurrent weights, which arch mingru has none of"):
        ModelConfig(vocab_size=20, arch="mingru", weight_drop=0.2).validate()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_min_cell_learns_generates_and_exports(mode, tmp_path, capsys):
    import json

    import charrnn

    from .conftest import TINY_KW, cli, make_text, unigram_entropy

    text = make_text(20_000)
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    charrnn.train(str(tmp_path / "c.txt"), tmp_path / "run", arch=mode, layers=2, max_steps=150, lr=3e-3,
                  progress=False, log=lambda m: None, **TINY_KW)
    lm = charrnn.load(tmp_path / "run")
    assert lm.evaluate()["loss"] < unigram_entropy(text) - 0.5
    sample = lm.generate("the ", 80, seed=1)[0]
    assert len(sample) == 84 and sample == lm.generate("the ", 80, seed=1)[0]
    code, _, err = cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    code, out, err = cli(capsys, "generate", tmp_path / "m.onnx", "--prompt", "the ", "--length", 80,
                         "--temperature", 0, "--json")
    assert code == 0 and json.loads(out)["samples"] == lm.generate("the ", 80, temperature=0), err
    assert not math.isnan(lm.evaluate()["bpc"])
