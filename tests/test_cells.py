"""The cell registry (charrnn/cells): a new cell is its own module and one registry line.

This file is such a module: a toy "leaky" cell with two state tensors, defined and registered here
alone, runs through config, CharLM, training, the Stepper, the Sampler, export and the torch-free runtime.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import charrnn
from charrnn import cells, runtime
from charrnn.config import ARCHS, ModelConfig, TrainConfig
from charrnn.errors import CharRNNError
from charrnn.export import export_onnx
from charrnn.models import CharLM
from charrnn.sampling import Sampler
from charrnn.stepper import Stepper
from charrnn.vocab import Vocab

from .conftest import TINY_KW, make_text

# The cell's description: the one line a new cell adds to charrnn/cells/__init__.py's CELLS.
LEAKY = cells.Cell("leaky", gates=2, impl=__name__, state=("h", "s"))


# -- the cell's implementation: build(), step(), onnx() ---------------------------------------------
# z = σ(W_z x + U_z h), n = tanh(W_n x + U_n h), s' = z s + (1 - z) n, h' = tanh(s')

def _equations(gi: torch.Tensor, gh: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z, n = (gi + gh).chunk(2, -1)
    z, n = torch.sigmoid(z), torch.tanh(n)
    s = z * s + (1 - z) * n
    return torch.tanh(s), s


class LeakyRNN(nn.Module):
    """A stack of leaky layers with ``nn.LSTM``'s interface: ``forward(x, (h0, s0) | None) -> (y, (h_n, s_n))``."""

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden, layers, dropout
        bound = 1 / math.sqrt(hidden)
        for i in range(layers):
            width = input_size if i == 0 else hidden
            for name, shape in ((f"weight_ih_l{i}", (2 * hidden, width)), (f"bias_ih_l{i}", (2 * hidden,)),
                                (f"weight_hh_l{i}", (2 * hidden, hidden)), (f"bias_hh_l{i}", (2 * hidden,))):
                self.register_parameter(name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor, state=None):
        B, T, _ = x.shape
        if state is None:
            zeros = x.new_zeros(self.num_layers, B, self.hidden_size)
            state = (zeros, zeros)
        hs, ss = [], []
        for i in range(self.num_layers):
            if i and self.training and self.dropout:
                x = F.dropout(x, self.dropout)
            p = {k: getattr(self, f"{k}_l{i}") for k in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")}
            gi = F.linear(x, p["weight_ih"], p["bias_ih"])
            h, s, ys = state[0][i], state[1][i], []
            for t in range(T):
                h, s = _equations(gi[:, t], F.linear(h, p["weight_hh"], p["bias_hh"]), s)
                ys.append(h)
            x = torch.stack(ys, 1)
            hs.append(h)
            ss.append(s)
        return x, (torch.stack(hs), torch.stack(ss))


def build(cell, input_size, hidden, layers, dropout):
    return LeakyRNN(input_size, hidden, layers, dropout)


def step(cell, gi, gh, state):
    return _equations(gi, gh, state[1])


def onnx(cell, g, gi, gh, state, split):
    z, n = g.op("Split", g.op("Add", gi, gh), split, axis=1, outputs=2)
    z, n = g.op("Sigmoid", z), g.op("Tanh", n)
    s = g.op("Add", n, g.op("Mul", z, g.op("Sub", state[1], n)))       # z s + (1 - z) n
    return g.op("Tanh", s), s


# -- the tests --------------------------------------------------------------------------------------

@pytest.fixture
def leaky():
    cells.register(LEAKY)
    try:
        yield LEAKY
    finally:
        cells.unregister(LEAKY.name)


def test_the_registry_describes_the_stock_cells():
    assert tuple(ARCHS) == ("gru", "lstm", "rnn", "mingru", "minlstm")
    assert {a: cells.cell(a).gates for a in ARCHS} == {"gru": 3, "lstm": 4, "rnn": 1, "mingru": 2, "minlstm": 3}
    assert [a for a in ARCHS if cells.cell(a).input_only] == ["mingru", "minlstm"]
    assert {a: cells.cell(a).native for a in ARCHS if cells.cell(a).native is not None} == {"gru": 0, "lstm": 1,
                                                                                            "rnn": 2}
    assert [a for a in ARCHS if len(cells.cell(a).state) > 1] == ["lstm"]
    with pytest.raises(CharRNNError, match="unknown recurrent cell 'nope'"):
        cells.cell("nope")
    with pytest.raises(ValueError, match="registered already"):
        cells.register(cells.Cell("gru", gates=3, impl="charrnn.cells.gru"))
    with pytest.raises(ValueError, match="native id 1"):
        cells.register(cells.Cell("other", gates=3, impl="charrnn.cells.gru", native=1))
    assert "other" not in ARCHS


def test_a_registered_cell_is_an_arch_choice_with_its_sizes(leaky):
    assert "leaky" in ARCHS and ARCHS[-1] == "leaky"
    TrainConfig(model=ModelConfig(arch="leaky", weight_drop=0.1)).validate()   # it has recurrent weights
    config = ModelConfig(vocab_size=20, arch="leaky", embed=8, hidden=16, layers=2)
    model = CharLM(config)
    assert isinstance(model.rnn, LeakyRNN)
    assert model.num_parameters() == config.num_parameters()
    assert [tuple(t.shape) for t in model.zero_state(3)] == [(2, 3, 16)] * 2


def test_a_registered_cell_trains(leaky):
    torch.manual_seed(0)
    vocab = Vocab.from_text(make_text(3_000))
    ids = torch.from_numpy(vocab.encode(make_text(3_000)).astype(np.int64)).view(-1, 50)[:32]
    model = CharLM(ModelConfig(vocab_size=len(vocab), arch="leaky", embed=8, hidden=32, layers=2, dropout=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("layers,embed", [(1, 8), (2, 0)])
def test_the_stepper_of_a_registered_cell_matches_the_full_forward(leaky, layers, embed):
    torch.manual_seed(1)
    model = CharLM(ModelConfig(vocab_size=20, arch="leaky", embed=embed, hidden=24, layers=layers)).eval()
    stepper = Stepper(model)
    assert stepper.backend == "python"          # no compiled step: the cell's step() in PyTorch
    with pytest.raises(CharRNNError, match="compiled sampling step is unavailable"):
        Stepper(model, backend="native")
    ids = torch.randint(0, 20, (3, 15))
    with torch.no_grad():
        want, want_state = model(ids)
        state = stepper.from_module_state(model.zero_state(3))
        for t in range(ids.shape[1]):
            logits, state = stepper.step(ids[:, t], state)
            torch.testing.assert_close(logits, want[:, t], atol=1e-5, rtol=1e-5)
    assert all(isinstance(layer, tuple) and len(layer) == 2 for layer in state)
    for got, w in zip(stepper.to_module_state(state), want_state):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)


def test_the_sampler_reads_prompts_with_a_registered_cell(leaky):
    torch.manual_seed(2)
    vocab = Vocab.from_text(make_text(2_000))
    model = CharLM(ModelConfig(vocab_size=len(vocab), arch="leaky", embed=8, hidden=24, layers=2)).eval()
    sampler = Sampler(model, vocab)
    a = sampler.generate("the ", 40, num_samples=2, seed=3)
    assert a == sampler.generate("the ", 40, num_samples=2, seed=3) and len(a) == 2
    logits, state = sampler.prime(["ab", "the "])        # two prompts: each layer's (h, s) concatenated
    assert logits.shape == (2, len(vocab)) and all(len(layer) == 2 for layer in state)


@pytest.mark.slow
def test_a_registered_cell_trains_exports_and_runs_without_torch_alike(leaky, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    result = charrnn.train(str(corpus), tmp_path / "run", arch="leaky", layers=2, max_steps=30, lr=3e-3,
                           progress=False, log=lambda m: None, **TINY_KW)
    assert result.best_val_loss < math.log(60)
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    lm = runtime.load(tmp_path / "m.onnx")
    assert lm.state_names == ["h", "s"] and [i.name for i in lm.session.get_outputs()] == ["logits", "h_out", "s_out"]
    model = charrnn.load(tmp_path / "run")
    prompt = make_text(120, seed=5)
    ids = torch.from_numpy(lm.vocab.encode(prompt).astype(np.int64))[None]
    with torch.no_grad():
        want, want_state = model.model(ids)
    assert np.abs(lm.logits(prompt) - want[0].numpy()).max() < 1e-4
    _, state = lm.prime([prompt, prompt])
    for got, w in zip(state, want_state, strict=True):
        assert np.abs(got - w.repeat(1, 2, 1).numpy()).max() < 1e-4
    assert lm.generate("the ", 60, temperature=0) == model.generate("the ", 60, temperature=0)
