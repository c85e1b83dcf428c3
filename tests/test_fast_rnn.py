"""charrnn.ops: same results as nn.GRU / nn.LSTM / nn.RNN, forward and backward, whichever backend runs
(switched with ops.use(...))."""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from charrnn import ops
from charrnn.models import CharLM, ModelConfig
from charrnn.ops import gru, matmul, torch_compat
from charrnn.ops.head import Head

B, T, I, H = 3, 7, 5, 16
CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@pytest.fixture
def use_backend():
    """``use_backend(**changes)``: ops.use(**changes) from here to the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(ops.use(**changes))


@pytest.fixture
def products(monkeypatch):
    """(kind, low) of every matmul.Product made during the test, in order."""
    made = []
    real_init = matmul.Product.__init__
    monkeypatch.setattr(matmul.Product, "__init__",
                        lambda self, w, rows, low=None: real_init(self, w, rows, low) or made.append((self.kind, low)))
    return made


def _make(arch, layers, dtype=torch.float32, batch_first=True, **kw):
    torch.manual_seed(1234)
    return CLASSES[arch](I, H, num_layers=layers, batch_first=batch_first, **kw).to(dtype)


def _state(arch, layers, dtype=torch.float32):
    h0 = torch.randn(layers, B, H, dtype=dtype, requires_grad=True)
    if arch == "lstm":
        return (h0, torch.randn(layers, B, H, dtype=dtype, requires_grad=True))
    return h0


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def _run(forward, rnn, x, state):
    """Outputs, and gradients of a loss that touches every output, w.r.t. params, x, state."""
    y, final = forward(rnn, x, state)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weights).sum() + sum((s ** 2).sum() for s in _flat(final))
    inputs = [x, *rnn.parameters()] + ([] if state is None else _flat(state))
    return [y, *_flat(final)], torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_torch_module(arch, layers, with_state):
    rnn = _make(arch, layers)
    torch.manual_seed(0)
    x = torch.randn(B, T, I, requires_grad=True)
    state = _state(arch, layers) if with_state else None
    assert ops.usable(rnn, x)
    ref_out, ref_grads = _run(lambda r, x, s: r(x, s), rnn, x, state)
    out, grads = _run(ops.rnn_forward, rnn, x, state)
    assert len(out) == len(ref_out) and len(grads) == len(ref_grads)
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_rnn_relu_and_time_major():
    for rnn in (_make("rnn", 2, nonlinearity="relu"), _make("gru", 2, batch_first=False)):
        torch.manual_seed(0)
        x = torch.randn(T, B, I, requires_grad=True)
        ref_out, ref_grads = _run(lambda r, x, s: r(x, s), rnn, x, None)
        out, grads = _run(ops.rnn_forward, rnn, x, None)
        for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_single_time_step():
    rnn = _make("lstm", 2)
    x = torch.randn(B, 1, I, requires_grad=True)
    ref_out, ref_grads = _run(lambda r, x, s: r(x, s), rnn, x, None)
    out, grads = _run(ops.rnn_forward, rnn, x, None)
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["gru", "lstm", "rnn_tanh", "rnn_relu"])
def test_gradcheck_float64(mode):
    torch.manual_seed(0)
    b, t, h = 2, 3, 4
    g = {"gru": 3, "lstm": 4}.get(mode, 1)
    gi = torch.randn(t, b, g * h, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True) if mode == "lstm" else None
    w = (torch.randn(g * h, h, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.randn(g * h, dtype=torch.float64, requires_grad=True)
    if mode == "rnn_relu":
        gi = (gi.detach() + 0.5).requires_grad_()   # keep pre-activations away from the kink at 0
    if mode == "lstm":
        fn = lambda gi, h0, c0, w, bias: ops.layer_forward(mode, gi, h0, c0, w, bias)
        inputs = (gi, h0, c0, w, bias)
    else:
        fn = lambda gi, h0, w, bias: ops.layer_forward(mode, gi, h0, None, w, bias)
        inputs = (gi, h0, w, bias)
    assert torch.autograd.gradcheck(fn, inputs)


def test_dropout_between_layers():
    rnn = _make("gru", 3, dropout=0.5)
    x = torch.randn(B, T, I)
    rnn.train()
    torch.manual_seed(7)
    a, _ = ops.rnn_forward(rnn, x)
    torch.manual_seed(7)
    b, _ = ops.rnn_forward(rnn, x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)           # same seed, same masks
    c, _ = ops.rnn_forward(rnn, x)
    assert not torch.equal(a, c)                                # dropout is active
    rnn.eval()                                                  # eval: no dropout, like nn.GRU
    torch.testing.assert_close(ops.rnn_forward(rnn, x)[0], rnn(x)[0], atol=1e-5, rtol=0)


def test_usable_conditions():
    rnn = _make("gru", 1)
    x = torch.randn(B, T, I)
    assert ops.usable(rnn, x)
    with torch.no_grad():
        assert not ops.usable(rnn, x)
        with ops.evaluation():
            assert ops.usable(rnn, x)
        assert not ops.usable(rnn, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.usable(rnn, x)                          # bf16 recurrent products
        assert not ops.usable(_make("gru", 1, torch.float64), x.double())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not ops.usable(rnn, x)
    assert not ops.usable(rnn, x[0])                       # unbatched input
    assert not ops.usable(nn.GRU(I, H, bidirectional=True), x)
    assert not ops.usable(nn.LSTM(I, H, proj_size=4), x)
    with ops.use(fast_rnn=False):
        assert not ops.usable(rnn, x)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
def test_bf16_autocast(arch, products):
    """Under bf16 autocast the loops multiply in bf16 (every product is built for it) and agree with
    the stock float32 module to bf16's precision, outputs and gradients in float32; the returned
    state too.  The backward runs outside autocast, as train_step's does."""
    rnn = _make(arch, 2)
    torch.manual_seed(0)
    x = torch.randn(B, T, I, requires_grad=True)
    state = _state(arch, 2)
    ref_out, ref_grads = _run(lambda r, x, s: r(x, s), rnn, x, state)

    def forward(r, x, s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.rnn_forward(r, x, s)

    out, grads = _run(forward, rnn, x, state)
    assert [low for _, low in products] == [torch.bfloat16] * 4                         # forward and backward, 2 layers
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.03 * b.abs().max().item(), rtol=0.03)
    assert any(not torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(grads, ref_grads))   # not float32


def test_bf16_product():
    """The bf16 product: x and w rounded to bf16, the product rounded to bf16, bias and other added
    in float32, through oneDNN and through mm."""
    torch.manual_seed(0)
    w, x, bias, other = torch.randn(12, 9), torch.randn(4, 9), torch.randn(12), torch.randn(4, 12)
    exact = (x.bfloat16().double() @ w.bfloat16().double().t()).float()
    for packed in (True, False):
        with ops.use(packed=packed):
            product = matmul.Product(w, 4, torch.bfloat16)
        assert product.kind == ("onednn" if packed and matmul.onednn_ok(w.bfloat16()) else "addmm")
        y = product(x)
        assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())    # rounded to bf16
        torch.testing.assert_close(y, exact, atol=1e-6, rtol=2 ** -7)                # by at most an ulp
        out = torch.full((4, 12), float("nan"))
        assert product(x, bias, other=other, out=out) is out
        torch.testing.assert_close(out, y + bias + other, atol=1e-6, rtol=0)


def _charlm_loss_and_grads(model, ids, targets, state=None):
    model.zero_grad()
    logits, final = model(ids, state)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    return loss.detach(), logits.detach(), final, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,embed", [("gru", 8), ("lstm", 8), ("rnn", 8), ("gru", 0), ("lstm", 0)])
def test_charlm_fast_path_matches_stock(arch, embed, monkeypatch):
    """dropout 0: the first projection is the vocab-table lookup (embedding or one-hot)."""
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, arch=arch, embed=embed, hidden=H, layers=2))
    model.train()
    ids = torch.randint(0, 11, (B, T))
    targets = torch.randint(0, 11, (B, T))
    state = model.zero_state(B)
    state = tuple(s + 0.1 for s in state) if isinstance(state, tuple) else state + 0.1

    calls = []
    real = ops.rnn_forward
    monkeypatch.setattr(ops, "rnn_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with ops.use(fast_rnn=True):
        fast = _charlm_loss_and_grads(model, ids, targets, state)
    assert calls, "fast path was not taken"
    n_calls = len(calls)
    with ops.use(fast_rnn=False):
        stock = _charlm_loss_and_grads(model, ids, targets, state)
    assert len(calls) == n_calls

    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], stock[1], atol=1e-5, rtol=0)
    for a, b in zip(_flat(fast[2]), _flat(stock[2])):
        assert a.shape == b.shape == (2, B, H)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert fast[3].keys() == stock[3].keys()
    for name in fast[3]:
        torch.testing.assert_close(fast[3][name], stock[3][name], atol=1e-4, rtol=0, msg=name)


def test_charlm_inference_uses_stock_module(monkeypatch):
    model = CharLM(ModelConfig(vocab_size=11, embed=8, hidden=H))
    monkeypatch.setattr(ops, "rnn_forward", lambda *a, **kw: pytest.fail("fast path under no_grad"))
    with torch.no_grad():
        logits, state = model(torch.randint(0, 11, (B, T)))
    assert logits.shape == (B, T, 11) and state.shape == (1, B, H)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
def test_evaluation_takes_the_fast_path_with_the_stock_loss(arch, monkeypatch):
    """training.evaluate (validation) runs the fast path, state carried over chunks, dropout off."""
    import numpy as np

    from charrnn.evaluation import evaluate

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, arch=arch, embed=8, hidden=H, layers=2, dropout=0.3))
    ids = np.random.default_rng(0).integers(1, 11, 500).astype(np.int32)     # no [UNK] (id 0): it is not scored
    calls = []
    real = ops.rnn_forward
    monkeypatch.setattr(ops, "rnn_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast = evaluate(model, ids, seq_len=9, n_streams=4)
    assert len(calls) == 14                                   # ceil(500 / 4 / 9) chunks
    with ops.use(fast_rnn=False):
        stock = evaluate(model, ids, seq_len=9, n_streams=4)
    assert len(calls) == 14 and model.training
    assert fast["chars"] == stock["chars"] == 499
    assert fast["loss"] == pytest.approx(stock["loss"], abs=1e-6)


def test_embedded_projection_matches_linear():
    torch.manual_seed(0)
    emb = torch.randn(11, 11, requires_grad=True)       # embed width = vocab, so one-hot fits too
    w = torch.randn(3 * H, 11, requires_grad=True)
    b = torch.randn(3 * H, requires_grad=True)
    ids = torch.randint(0, 11, (B, T))
    dgi = torch.randn(T, B, 3 * H)
    for embedding in (emb, None):
        x = F.embedding(ids, emb) if embedding is not None else F.one_hot(ids, 11).float()
        ref = F.linear(x.transpose(0, 1), w, b)
        out = ops.embedded_projection(ids, w, b, embedding)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        leaves = [w, b] + ([emb] if embedding is not None else [])
        for g, g_ref in zip(torch.autograd.grad(out, leaves, dgi), torch.autograd.grad(ref, leaves, dgi)):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=0)


def test_charlm_dropout_fast_path_is_deterministic(monkeypatch):
    """dropout > 0 (between layers and on the output; the embedding lookup path stays): same seed, same result."""
    model = CharLM(ModelConfig(vocab_size=11, arch="gru", embed=8, hidden=H, layers=2, dropout=0.3))
    model.train()
    ids, targets = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    calls = []
    real = ops.rnn_forward
    monkeypatch.setattr(ops, "rnn_forward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    torch.manual_seed(5)
    a = _charlm_loss_and_grads(model, ids, targets)
    torch.manual_seed(5)
    b = _charlm_loss_and_grads(model, ids, targets)
    assert len(calls) == 2 and all("table" in c for c in calls)  # fast path with the table lookup
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], atol=0, rtol=0)
    model.eval()                                                # eval with grad: lookup, no dropout
    fast = _charlm_loss_and_grads(model, ids, targets)
    with ops.use(fast_rnn=False):
        stock = _charlm_loss_and_grads(model, ids, targets)
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    for name in fast[3]:
        torch.testing.assert_close(fast[3][name], stock[3][name], atol=1e-4, rtol=0, msg=name)


def _layer_case(mode, dtype=torch.float32, b=3, t=5, h=6, vocab=7):
    torch.manual_seed(3)
    g = {"gru": 3, "lstm": 4}.get(mode, 1)
    table = torch.randn(vocab, g * h, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, vocab, (b, t))
    h0 = torch.randn(b, h, dtype=dtype, requires_grad=True)
    c0 = torch.randn(b, h, dtype=dtype, requires_grad=True) if mode == "lstm" else None
    w = (torch.randn(g * h, h, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(g * h, dtype=dtype, requires_grad=True)
    leaves = [table, h0, w, bias] + ([c0] if c0 is not None else [])
    return table, ids, h0, c0, w, bias, leaves


def _weighted(out):
    ys = out[0]
    weights = torch.linspace(-1, 1, ys.numel(), dtype=ys.dtype).view_as(ys)
    return (ys * weights).sum() + sum((s ** 2).sum() for s in out[1:])


@pytest.mark.parametrize("mode", ["gru", "lstm", "rnn_tanh", "rnn_relu"])
def test_table_lookup_matches_the_materialised_projection(mode):
    """ids + table (rows looked up per step, the table's gradient by index-add) = F.embedding first."""
    table, ids, h0, c0, w, bias, leaves = _layer_case(mode)
    looked_up = ops.layer_forward(mode, table, h0, c0, w, bias, ids=ids)
    materialised = ops.layer_forward(mode, F.embedding(ids.t(), table), h0, c0, w, bias)
    for a, b in zip(looked_up, materialised):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(torch.autograd.grad(_weighted(looked_up), leaves),
                    torch.autograd.grad(_weighted(materialised), leaves)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["gru", "lstm", "rnn_tanh"])
def test_gradients_written_over_saved_buffers_only_when_the_graph_is_freed(mode, monkeypatch):
    """A backward that keeps the graph leaves the saved activations intact (so a second one gives
    the same gradients); the last one, which frees the graph, reuses them for the gradients."""
    seen = []
    real = torch_compat.keep_graph
    monkeypatch.setattr(torch_compat, "keep_graph", lambda: seen.append(real()) or seen[-1])
    table, ids, h0, c0, w, bias, leaves = _layer_case(mode)
    loss = _weighted(ops.layer_forward(mode, table, h0, c0, w, bias, ids=ids))
    kept1 = torch.autograd.grad(loss, leaves, retain_graph=True)
    kept2 = torch.autograd.grad(loss, leaves, retain_graph=True)
    freed = torch.autograd.grad(loss, leaves)
    for a, b, c in zip(kept1, kept2, freed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    if mode != "rnn_tanh":                      # the Elman cell keeps a separate gradient buffer
        assert seen == [True, True, False]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("mode", ["gru", "lstm", "rnn_tanh"])
def test_gradcheck_table_lookup_float64(mode):
    table, ids, h0, c0, w, bias, leaves = _layer_case(mode, torch.float64, b=2, t=3, h=3, vocab=4)
    if mode == "lstm":
        fn = lambda table, h0, w, bias, c0: ops.layer_forward(mode, table, h0, c0, w, bias, ids=ids)
    else:
        fn = lambda table, h0, w, bias: ops.layer_forward(mode, table, h0, None, w, bias, ids=ids)
    assert torch.autograd.gradcheck(fn, tuple(leaves))


# ------------------------------------------------------------------ the output layer folded into the GRU

def _head_case(dtype=torch.float32, b=3, t=5, h=6, vocab=7, out=4):
    table, ids, h0, _, w, bias, leaves = _layer_case("gru", dtype, b, t, h, vocab)
    w_out = torch.randn(out, h, dtype=dtype, requires_grad=True)
    b_out = torch.randn(out, dtype=dtype, requires_grad=True)
    return table, ids, h0, w, bias, w_out, b_out, leaves + [w_out, b_out]


def test_gradcheck_folded_head_float64():
    table, ids, h0, w, bias, w_out, b_out, leaves = _head_case(torch.float64, b=2, t=3, h=3, vocab=4, out=2)
    fn = lambda table, h0, w, bias, w_out, b_out: gru.GRUFunction.apply(  # noqa: E731
        table, ids, h0, w, bias, None, w_out, b_out, 0.0, 0)
    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("p,native,chunk,low", [(0.0, True, None, None), (0.0, False, None, None),
                                                 (0.3, True, None, None), (0.3, True, 2 * 4 * 16, None),
                                                 (0.3, True, 1, None), (0.0, False, 16 * 4 * 16, None),
                                                 (0.0, True, None, torch.bfloat16),
                                                 (0.3, True, 16 * 4 * 16, torch.bfloat16)])   # dropout: compiled only
def test_folded_head_matches_the_layer_then_the_head(p, native, chunk, low, monkeypatch, use_backend):
    """logits = dropout(ys) @ w_out.t() + b_out inside the layer: the same logits and gradients as
    the layer's outputs through an explicit head with the same masks (the kernel's mask of the
    outputs in time-major order); with the graph kept, twice the same.  Under bf16 (low), the
    head's products in bf16 too, to bf16's precision."""
    kernels = _kernels() if native else None
    use_backend(native=native)
    if chunk:              # the outputs 2 steps at a time (their gradients 1), 1 (1), 16 (4: 2 + 4 of T = 6)
        monkeypatch.setattr(Head, "chunk", chunk)
    table, ids, h0, w, bias, w_out, b_out, leaves = _head_case(b=4, t=6, h=16, vocab=9, out=5)
    seed = 12345
    logits, hT = gru.GRUFunction.apply(table, ids, h0, w, bias, low, w_out, b_out, p, seed)
    ys, hT_ref = gru.GRUFunction.apply(table, ids, h0, w, bias, low)
    masks = kernels.dropout(torch.ones(6, 4, 16), p, seed).transpose(0, 1) if p else torch.ones(1)
    if p:
        assert 0 < (masks == 0).float().mean() < 1 and not torch.equal(masks[:, 0], masks[:, 1])
    ref = F.linear(ys * masks, w_out, b_out)
    weights = torch.linspace(-1, 1, ref.numel()).view_as(ref)
    want = torch.autograd.grad((ref * weights).sum() + (hT_ref ** 2).sum(), leaves)
    torch.testing.assert_close(hT, hT_ref, atol=0, rtol=0)
    if low is None:
        tol = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    else:
        tol = dict(atol=0.03 * max(g.abs().max().item() for g in want), rtol=0.03)
        assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())
        torch.testing.assert_close(logits, ref, atol=0.03 * ref.abs().max().item(), rtol=0.03)
    loss = (logits * weights).sum() + (hT ** 2).sum()
    for _ in range(2):
        for a, b in zip(torch.autograd.grad(loss, leaves, retain_graph=True), want):
            torch.testing.assert_close(a, b, **tol)
    for a, b in zip(torch.autograd.grad(loss, leaves), want):    # the last backward reuses the saved buffers
        torch.testing.assert_close(a, b, **tol)


def test_charlm_folds_its_head_into_the_gru(monkeypatch):
    """CharLM's training forward folds head + output dropout into the GRU (not for last_only, an LSTM or
    dropout without the compiled kernels), and the model still learns a copy task with it."""
    calls = []
    real = ops.rnn_forward
    monkeypatch.setattr(ops, "rnn_forward", lambda *a, **kw: calls.append(kw.get("head")) or real(*a, **kw))
    ids = torch.randint(1, 11, (B, T))
    for arch, dropout, folded in (("gru", 0.0, True), ("gru", 0.2, ops.backend.kernels(torch.ones(1)) is not None), ("lstm", 0.0, False)):
        model = CharLM(ModelConfig(vocab_size=11, arch=arch, embed=8, hidden=H, dropout=dropout))
        logits, _ = model(ids)
        assert logits.shape == (B, T, 11) and (calls.pop() is model.head) == folded
        model(ids, last_only=True)
        assert calls.pop() is None
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, arch="gru", embed=8, hidden=32, dropout=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = torch.randint(1, 11, (16, 12))
    for _ in range(150):                                # predict the previous character
        logits, _ = model(data)
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, 11), data[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert calls[-1] is model.head and loss.item() < 0.2


# ------------------------------------------------------------------ the compiled LSTM loops

def _kernels():
    from charrnn import native
    module = native.load()
    if module is None:
        pytest.skip(f"the compiled kernels are unavailable here ({native.error()})")
    return module


def _lstm_both_ways(run):
    """``run()``'s results with the compiled loops (LSTM) / steps (GRU) and with the ATen loops."""
    with ops.use(native=True):
        compiled = run()
    with ops.use(native=False):
        return compiled, run()


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("h", [16, 13, 29])          # whole 8-column blocks and leftovers
@pytest.mark.parametrize("lookup", [True, False])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_compiled_loops_match_the_aten_loops(portable, h, lookup, mode):
    """The LSTM's compiled loops and the GRU's compiled steps against the ATen loops, forward and
    backward, AVX2 and portable, table lookup and a materialised input projection."""
    kernels = _kernels()
    if not portable and not kernels.has_avx2():
        pytest.skip("no AVX2 here")
    kernels.set_portable(portable)
    try:
        table, ids, h0, c0, w, bias, leaves = _layer_case(mode, b=5, t=9, h=h, vocab=11)
        def run():
            gi = table if lookup else F.embedding(ids.t(), table)
            out = ops.layer_forward(mode, gi, h0, c0, w, bias, ids=ids if lookup else None)
            return [o.detach() for o in out], torch.autograd.grad(_weighted(out), leaves)

        (out_c, grads_c), (out_a, grads_a) = _lstm_both_ways(run)
    finally:
        kernels.set_portable(False)
    for a, b in zip(out_c, out_a):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    for a, b in zip(grads_c, grads_a):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("use", ["last h", "outputs", "last c"])
def test_compiled_lstm_with_unused_outputs(use):
    """Outputs the loss does not touch reach the compiled backward as None (nothing materialised)."""
    _kernels()
    table, ids, h0, c0, w, bias, leaves = _layer_case("lstm", b=4, t=6, h=24, vocab=9)

    def run():
        ys, h_n, c_n = ops.layer_forward("lstm", table, h0, c0, w, bias, ids=ids)
        loss = {"last h": (h_n * h_n).sum(), "outputs": ys[2:].sum(), "last c": c_n.sum()}[use]
        return torch.autograd.grad(loss, leaves)

    for a, b in zip(*_lstm_both_ways(run)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_last_only_logits_and_gradients(arch):
    """CharLM(last_only=True) gives the last position's logits and the gradients of a loss on them."""
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, arch=arch, embed=0, hidden=20, layers=2, dropout=0.0))
    ids = torch.randint(0, 11, (6, 8))
    full, _ = model(ids)
    last, _ = model(ids, last_only=True)
    assert last.shape == (6, 1, 11)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    g_full = torch.autograd.grad(full[:, -1].logsumexp(-1).sum(), list(model.parameters()))
    g_last = torch.autograd.grad(last.logsumexp(-1).sum(), list(model.parameters()))
    for a, b in zip(g_last, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _product_kind(kind, use_backend):
    """Make matmul.Product choose ``kind`` ("panels", "onednn" or "addmm"), or skip when this machine
    cannot."""
    use_backend(packed=kind != "addmm", native=kind == "panels",
                onednn_first=kind == "onednn")   # oneDNN before the panels or not
    if kind == "panels" and not _kernels().has_fma():
        pytest.skip("no AVX2 + FMA here")
    if kind == "onednn" and not matmul.onednn_ok(torch.ones(1)):
        pytest.skip("this torch has no oneDNN packed matmul")


@pytest.mark.parametrize("kind", ["panels", "onednn", "addmm"])
def test_step_product(kind, use_backend):
    """x @ w.t() (+ bias) (+ other), into out or not, through each of the three products."""
    _product_kind(kind, use_backend)
    torch.manual_seed(0)
    w, x, bias, other = torch.randn(12, 9), torch.randn(4, 9), torch.randn(12), torch.randn(4, 12)
    product = matmul.Product(w.t().contiguous().t(), rows=4)    # any strides for w
    assert product.kind == kind
    for b in (None, bias):
        for o in (None, other):
            want = x @ w.t() + (0 if b is None else b) + (0 if o is None else o)
            torch.testing.assert_close(product(x, b, other=o), want, atol=1e-5, rtol=0)
            out = torch.full((4, 12), float("nan"))
            assert product(x, b, other=o, out=out) is out
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("avx512", [False, True])
def test_product_choice(avx512):
    """With everything available, the panels on AVX2 CPUs and oneDNN on AVX-512 ones; MKL's addmm
    from 512 rows on."""
    if not _kernels().has_fma() or not matmul.onednn_ok(torch.ones(1)):
        pytest.skip("needs both the panels and oneDNN")
    w = torch.randn(48, 32)
    with ops.use(native=True, packed=True, onednn_first=avx512):
        assert matmul.Product(w, 64).kind == ("onednn" if avx512 else "panels")
        assert matmul.Product(w, 512).kind == "addmm"
    with ops.use(native=True, packed=True, onednn_first=None):           # None: as this CPU runs PyTorch
        assert matmul.Product(w, 64).kind == ("onednn" if torch_compat.avx512() else "panels")


@pytest.mark.parametrize("rows,n,k", [(1, 24, 3), (4, 48, 512), (7, 25, 600), (32, 71, 1100), (13, 5, 1)])
def test_panel_product_shapes(rows, n, k, use_backend):
    """The packed panels against addmm in float64 for every remainder: rows not a multiple of the
    4-row tile, columns not a multiple of the 24-column panel, K across several 512-column chunks;
    x, other and out as rows of wider buffers; out written over other."""
    _product_kind("panels", use_backend)
    torch.manual_seed(rows + n + k)
    w, bias = torch.randn(n, k), torch.randn(n)
    x = torch.randn(rows, 3, k)[:, 1]                 # row stride 3k
    other = torch.randn(rows, 2, n)[:, 0]
    want = (x.double() @ w.double().t() + bias.double() + other.double()).float()
    product = matmul.Product(w, rows)
    assert product.kind == "panels"
    buf = torch.full((rows, 2, n), float("nan"))
    out = product(x, bias, other=other, out=buf[:, 1])
    torch.testing.assert_close(out, want, atol=1e-4 * k ** 0.5, rtol=1e-5)
    assert torch.isnan(buf[:, 0]).all()               # nothing written outside out's rows
    torch.testing.assert_close(product(x, None), (x.double() @ w.double().t()).float(), atol=1e-4 * k ** 0.5,
                               rtol=1e-5)
    product(x, bias, other=other, out=other)          # out may be other
    torch.testing.assert_close(other, want, atol=1e-4 * k ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("kind", ["panels", "onednn", "addmm"])
def test_loops_with_each_product(arch, kind, products, use_backend):
    """The time loops agree with the stock module whichever product they use, and use the one asked for
    (with native off, the LSTM's ATen loops; with it on, its compiled loops take the panels themselves)."""
    _product_kind(kind, use_backend)
    rnn = _make(arch, 2)
    torch.manual_seed(0)
    x = torch.randn(B, T, I, requires_grad=True)
    state = _state(arch, 2)
    ref_out, ref_grads = _run(lambda r, x, s: r(x, s), rnn, x, state)
    out, grads = _run(ops.rnn_forward, rnn, x, state)
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert [k for k, _ in products] == ([] if arch == "lstm" and kind == "panels" else [kind] * 4)   # forward, backward, 2 layers


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_compiled_dropout_mask(p):
    """The compiled dropout: a fraction p of zeros, the rest scaled by 1/(1-p), masks that differ
    from call to call and from one element to the next, a seed that reproduces them, and the
    same mask in the backward pass."""
    _kernels()
    n = 1 << 20
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(3)
    y = ops.dropout(x, p)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.004          # 4 sd of a binomial at n = 2^20
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # Neighbouring elements and elements 1024 apart (the next row of a (.., 1024) output) are independent.
    k = kept.float() - kept.float().mean()
    for lag in (1, 1024):
        assert abs((k[:-lag] * k[lag:]).mean().item() / k.var().item()) < 0.01
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2 * y.detach())                       # the same mask, recomputed
    torch.manual_seed(3)
    assert torch.equal(ops.dropout(x.detach(), p), y.detach())  # same seed, same mask
    again = ops.dropout(x.detach(), p) != 0
    assert 0.5 < (again == kept).float().mean().item() < 1            # the next call: another mask


def test_compiled_dropout_same_mask_portable_and_any_threads():
    """The mask is a function of the seed and the element's index alone: the AVX2 loop, the
    portable loop and any number of threads give the same result; NaNs propagate as in F.dropout."""
    kernels = _kernels()
    x = torch.randn(3, 100_003)
    x[0, 5] = float("nan")
    ref = kernels.dropout(x, 0.3, 12345)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.allclose(kernels.dropout(x, 0.3, 12345), ref, rtol=0, atol=0, equal_nan=True)
        kernels.set_portable(True)
        assert torch.allclose(kernels.dropout(x, 0.3, 12345), ref, rtol=0, atol=0, equal_nan=True)
    finally:
        kernels.set_portable(False)
        torch.set_num_threads(threads)
    assert torch.isnan(ref[0, 5])
    assert not torch.equal(kernels.dropout(x, 0.3, 12346)[1:] != 0, ref[1:] != 0)


def test_dropout_falls_back_to_torch():
    """Without the compiled kernels (or off the CPU, or in eval mode) dropout is F.dropout's."""
    x = torch.randn(4, 1000)
    assert ops.dropout(x, 0.5, training=False) is x
    torch.manual_seed(9)
    with ops.use(native=False):
        a = ops.dropout(x, 0.5)
    torch.manual_seed(9)
    torch.testing.assert_close(a, F.dropout(x, 0.5, training=True), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
def test_weight_drop_is_dropconnect_on_the_recurrent_weights(arch):
    """rnn_forward(weight_drop=p): each layer's weight_hh through dropout once per forward (one
    mask for every step and sequence), outputs and gradients those of the stock module run on
    the dropped weights; dropped entries get no gradient."""
    rnn = _make(arch, 2)
    x = torch.randn(B, T, I, requires_grad=True)
    p = 0.4

    def stock_on_dropped(r, x, s):
        torch.manual_seed(7)
        dropped = {f"weight_hh_l{k}": ops.dropout(getattr(r, f"weight_hh_l{k}"), p) for k in range(2)}
        return torch.func.functional_call(r, dropped, (x, s))

    def fast(r, x, s):
        torch.manual_seed(7)
        return ops.rnn_forward(r, x, s, weight_drop=p)

    out, grads = _run(fast, rnn, x, None)
    ref_out, ref_grads = _run(stock_on_dropped, rnn, x, None)
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    plain, _ = _run(ops.rnn_forward, rnn, x, None)
    assert (out[0] - plain[0]).abs().max() > 1e-2                     # the drop changed the outputs
    names = [name for name, _ in rnn.named_parameters()]
    for k in range(2):
        g = grads[1 + names.index(f"weight_hh_l{k}")]
        assert abs((g == 0).float().mean().item() - p) < 0.1        # a fraction p of entries dropped


def test_charlm_weight_drop_in_training_only(use_backend):
    """CharLM(weight_drop): masks in training on the fast path and on the stock module's path (the
    GPU one, through functional_call), none in eval; the parameters are untouched."""
    model = CharLM(ModelConfig(vocab_size=11, arch="lstm", embed=8, hidden=H, layers=2, weight_drop=0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, targets = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    model.eval()
    reference = _charlm_loss_and_grads(model, ids, targets)
    for enabled in (True, False):
        use_backend(fast_rnn=enabled)
        model.train()
        torch.manual_seed(2)
        a = _charlm_loss_and_grads(model, ids, targets)
        torch.manual_seed(2)
        b = _charlm_loss_and_grads(model, ids, targets)
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)          # same seed, same masks
        assert abs(a[0] - reference[0]) > 1e-4
        for k in range(2):
            assert 0.35 < (a[3][f"rnn.weight_hh_l{k}"] == 0).float().mean().item() < 0.65
            assert (a[3][f"rnn.weight_ih_l{k}"] == 0).float().mean().item() < 0.05
        model.eval()
        again = _charlm_loss_and_grads(model, ids, targets)
        torch.testing.assert_close(again[0], reference[0], atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ private torch APIs: the public fallbacks

def _layer_grads(mode):
    table, ids, h0, c0, w, bias, leaves = _layer_case(mode, b=4, t=6, h=16, vocab=9)
    out = ops.layer_forward(mode, table, h0, c0, w, bias, ids=ids)
    return [o.detach() for o in out] + list(torch.autograd.grad(_weighted(out), leaves))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("mode", ["gru", "lstm", "rnn_tanh"])
def test_without_the_keep_graph_probe_the_results_are_the_same(mode, native):
    """No keep_graph probe: the backward assumes the graph is kept (never writes over its saved
    buffers), the same numbers bit for bit."""
    if native:
        _kernels()
    with ops.use(native=native):
        probed = _layer_grads(mode)
        with torch_compat.without(torch_compat.KEEP_GRAPH):
            assert torch_compat.keep_graph()
            fallback = _layer_grads(mode)
    for a, b in zip(probed, fallback):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["gru", "lstm", "rnn_tanh"])
def test_without_the_aten_activation_backward_the_results_are_the_same(mode):
    """No torch.ops.aten.{sigmoid,tanh}_backward: the same formulas in public ops, to rounding, also
    when the output is written over the activation itself (as the ATen loops do)."""
    torch.manual_seed(0)
    grad, a = torch.randn(5, 8), torch.randn(5, 8)
    for fn, act in ((torch_compat.sigmoid_backward, torch.sigmoid), (torch_compat.tanh_backward, torch.tanh)):
        y = act(a)
        want = fn(grad, y, torch.empty_like(y))
        with torch_compat.without(torch_compat.ACTIVATION_BACKWARD):
            over_y = y.clone()
            got = fn(grad, over_y, over_y)
        assert got is over_y
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with ops.use(native=False):
        probed = _layer_grads(mode)
        with torch_compat.without(torch_compat.ACTIVATION_BACKWARD):
            fallback = _layer_grads(mode)
    for a, b in zip(probed, fallback):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_without_onednn_the_products_fall_back_to_addmm(arch, low, products):
    """No oneDNN packed linear: every product is addmm (mm for bf16), with the same results."""
    if not matmul.onednn_ok(torch.ones(1)):
        pytest.skip("this torch has no oneDNN packed matmul")
    rnn = _make(arch, 2)
    torch.manual_seed(0)
    x = torch.randn(B, T, I, requires_grad=True)
    state = _state(arch, 2)

    def forward(r, x, s):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low is not None):
            return ops.rnn_forward(r, x, s)

    with ops.use(native=False, packed=True, onednn_first=True):
        probed = _run(forward, rnn, x, state)
        assert {k for k, _ in products} == {"onednn"}
        products.clear()
        with torch_compat.without(torch_compat.ONEDNN_LINEAR):
            assert not matmul.onednn_ok(torch.ones(1))
            fallback = _run(forward, rnn, x, state)
    assert products and {k for k, _ in products} == {"addmm"}
    tol = dict(atol=1e-5, rtol=0) if low is None else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(probed[0] + list(probed[1]), fallback[0] + list(fallback[1])):
        torch.testing.assert_close(a, b, **tol)


def test_without_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown private APIs"):
        with torch_compat.without("mallopt"):
            pass


# ------------------------------------------------------------------ the backend switch

def test_backend_use_nests_restores_and_stays_in_its_thread():
    import threading

    before = ops.backend.current()
    with ops.use(native=False) as b:
        assert b == ops.backend.current() and not b.native and b.packed == before.packed
        with ops.use(packed=False):
            assert ops.backend.current() == ops.Backend(before.fast_rnn, False, False, before.onednn_first)
        assert ops.backend.current() == b
        seen = []
        thread = threading.Thread(target=lambda: seen.append(ops.backend.current()))
        thread.start()
        thread.join()
        assert seen == [ops.backend.DEFAULT]            # another thread keeps the defaults
    assert ops.backend.current() == before
    with pytest.raises(TypeError):
        with ops.use(natve=False):
            pass


@pytest.mark.slow
def test_environment_variables_set_the_defaults():
    import subprocess
    import sys

    code = "from charrnn import ops; b = ops.backend.current(); print(b.fast_rnn, b.native, b.packed)"
    for env, want in (({}, "True True True"),
                      ({"CHARRNN_FAST_RNN": "0", "CHARRNN_NATIVE": "off", "CHARRNN_PACKED": "false"},
                       "False False False")):
        env = {**os.environ, "CHARRNN_FAST_RNN": "1", "CHARRNN_NATIVE": "1", "CHARRNN_PACKED": "1", **env}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == want.split()
