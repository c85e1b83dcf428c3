"""The compiled sampling step (charrnn.native) against the pure-PyTorch one: the same numbers, bit for bit.

The first test to need the extension compiles it (about a minute, once per machine; later runs
load the cached build).  Without a C++ compiler or ninja those tests are skipped; with them, a
build that fails is a test failure.
"""

import pytest
import torch

from charrnn import ops
from charrnn.errors import CharRNNError
from charrnn.models import CharLM, ModelConfig
from charrnn.decoding import choose
from charrnn.sampling import Sampler
from charrnn.stepper import Stepper, _Linear
from charrnn.vocab import Vocab


def _model(arch="gru", layers=1, embed=8, hidden=24, vocab=20, seed=1):
    torch.manual_seed(seed)
    return CharLM(ModelConfig(vocab_size=vocab, arch=arch, embed=embed, hidden=hidden, layers=layers)).eval()


def _flat(state):
    return [t for s in state for t in (s if isinstance(s, tuple) else (s,))]


@pytest.fixture(params=["avx2", "portable"])
def kernels(compiled, request):
    """The AVX2 kernels (where the CPU has them) and the portable loops other CPUs run."""
    if request.param == "avx2" and not compiled.has_avx2():
        pytest.skip("no AVX2 here")
    compiled.set_portable(request.param == "portable")
    yield compiled
    compiled.set_portable(False)


@pytest.mark.parametrize("batch", [1, 2, 4, 7, 64])
@pytest.mark.parametrize("k,n", [(5, 3), (37, 70), (256, 96), (4300, 40)])
def test_int8_products_are_exact(kernels, batch, k, n):
    """Kernels (batch 1: 32 rows at a time; batches: 16 rows x 4 samples) = PyTorch emulation = int64 sums."""
    compiled = kernels
    torch.manual_seed(k + n + batch)
    lin = _Linear(torch.randn(n, k) / k ** 0.5, torch.randn(n), int8=True)
    x = torch.randn(batch, k)
    x[0, :3] = 0.0                                   # zeros stay zeros
    if batch > 2:
        x[2] = 0.0                                   # an all-zero row: scale 0, output = bias
    out = compiled.int8_linear(x, lin.native_parts(), n)
    assert torch.equal(out, lin(x))
    # The integer sums, computed independently in int64.
    m = x.abs().amax(1, keepdim=True)
    xq = torch.round(x * torch.where(m > 0, 63 / m, torch.zeros(()))).long()
    acc = (xq @ lin.q.long().t()).float()
    assert torch.equal(out, acc * ((m / 63) * lin.sw) + lin.b)
    assert xq.abs().max() <= 63 and lin.q.abs().max() <= 63


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("layers,embed,hidden", [(1, 8, 24), (2, 0, 37), (3, 8, 16)])
@pytest.mark.parametrize("weights,portable", [("fp32", False), ("int8", False), ("int8", True)])
def test_compiled_step_is_bit_identical_to_python(compiled, arch, layers, embed, hidden, weights, portable):
    """fp32 and int8 steps, the int8 ones with the AVX2 kernels and with the portable loops."""
    if not portable and not compiled.has_avx2():
        pytest.skip("no AVX2 here")
    compiled.set_portable(portable)
    try:
        _check_step_identity(arch, layers, embed, hidden, weights)
    finally:
        compiled.set_portable(False)


def _check_step_identity(arch, layers, embed, hidden, weights):
    model = _model(arch, layers, embed, hidden)
    fast = Stepper(model, weights, backend="native")
    slow = Stepper(model, weights, backend="python")
    assert fast.backend == "native" and slow.backend == "python"
    for batch in (1, 3, 7):
        ids = torch.randint(0, 20, (batch, 10))
        sa = fast.from_module_state(model.zero_state(batch))
        sb = slow.from_module_state(model.zero_state(batch))
        with torch.inference_mode():
            for t in range(10):
                la, sa = fast.step(ids[:, t], sa)
                lb, sb = slow.step(ids[:, t], sb)
                assert torch.equal(la, lb), (batch, t)
                assert all(torch.equal(a, b) for a, b in zip(_flat(sa), _flat(sb)))


def test_compiled_step_matches_the_fused_forward(compiled):
    model = _model("gru", 2, 8, 32)
    ids = torch.randint(0, 20, (4, 12))
    stepper = Stepper(model, backend="native")
    state = stepper.from_module_state(model.zero_state(4))
    with torch.no_grad():
        want, _ = model(ids)
        got = []
        for t in range(12):
            logits, state = stepper.step(ids[:, t], state)
            got.append(logits)
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=1e-4)


def test_int8_rows_do_not_depend_on_the_rest_of_the_batch(compiled):
    """Activations are quantised per sample: a sample's logits are the same alone or batched."""
    model = _model("gru", 2, 8, 40)
    stepper = Stepper(model, "int8")
    ids = torch.tensor([3, 7, 11])
    state = [torch.randn(3, 40).tanh() * s for s in (1.0, 0.1)]
    with torch.inference_mode():
        together, _ = stepper.step(ids, state)
        for i in range(3):
            alone, _ = stepper.step(ids[i:i + 1], [s[i:i + 1] for s in state])
            assert torch.equal(alone[0], together[i])


def test_compiled_sampling_draws_the_same_ids(compiled):
    torch.manual_seed(0)
    for trial in range(60):
        batch, vocab = (1, 3, 64)[trial % 3], (2, 11, 66)[trial % 3]
        logits = torch.randn(batch, vocab) * (trial % 5 + 0.5)
        temperature = (1.0, 0.7, 1 / 3, 2.5)[trial % 4]
        g1, g2 = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        fast = compiled.sample(logits, g1, temperature)
        slow = choose(logits, temperature, None, None, g2, compiled=False)
        assert torch.equal(fast, slow)
        assert (fast != 0).all()                               # never [UNK]
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # same draws consumed


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_same_seed_same_text_with_or_without_the_compiler(compiled, weights, arch):
    vocab = Vocab(list("\n abcdefgh"))
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=len(vocab), arch=arch, embed=8, hidden=32, layers=2))
    fast = Sampler(model, vocab, weights, backend="native")
    slow = Sampler(model, vocab, weights, backend="python")
    for kw in (dict(num_samples=1), dict(num_samples=5), dict(num_samples=3, top_k=4, top_p=0.9)):
        a = fast.generate("abc", 80, seed=3, temperature=0.8, **kw)
        b = slow.generate("abc", 80, seed=3, temperature=0.8, **kw)
        assert a == b


def test_can_be_turned_off():
    with ops.use(native=False):                     # what CHARRNN_NATIVE=0 sets
        assert ops.backend.compiled() is None
        assert Stepper(_model()).backend == "python"
        with pytest.raises(CharRNNError, match="CHARRNN_NATIVE"):
            Stepper(_model(), backend="native")
    with pytest.raises(ValueError):
        Stepper(_model(), backend="fast")


def test_compiled_draws_groups_of_rows_as_each_group_alone(compiled):
    """sample_rows (the server's batch of requests): each group of rows, with its own generator and temperature,
    gets the ids sample() gives it alone, and its generator moves as far."""
    torch.manual_seed(0)
    for trial in range(40):
        sizes = [1 + (trial * 7 + i) % 4 for i in range(1 + trial % 6)]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        logits = torch.randn(sum(sizes), (2, 11, 66)[trial % 3]) * (trial % 5 + 0.5)
        temperatures = [(1.0, 0.7, 1 / 3, 2.5)[(trial + i) % 4] if trial % 2 else 0.7 for i in range(len(sizes))]
        gens = [torch.Generator().manual_seed(trial * 10 + i) for i in range(len(sizes))]
        alone = [torch.Generator().manual_seed(trial * 10 + i) for i in range(len(sizes))]
        ids = torch.full((sum(sizes),), -1, dtype=torch.long)
        compiled.sample_rows(logits, gens, temperatures, starts, sizes, ids)
        for g, a, s, n, t in zip(gens, alone, starts, sizes, temperatures):
            assert torch.equal(ids[s:s + n], compiled.sample(logits[s:s + n].clone(), a, t))
            assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=a))
    untouched = torch.full((4,), -1, dtype=torch.long)        # rows in no group are left alone
    compiled.sample_rows(torch.randn(4, 5), [None], [1.0], [1], [2], untouched)
    assert untouched[0] == -1 and untouched[3] == -1 and (untouched[1:3] > 0).all()
    with pytest.raises(RuntimeError, match="out of range"):
        compiled.sample_rows(torch.randn(4, 5), [None], [1.0], [3], [2], untouched)


@pytest.mark.parametrize("backend", ["native", "python"])
def test_a_batch_of_decodings_chooses_what_each_would_alone(compiled, backend):
    """BatchChoice: requests with the plain draw (drawn together) beside ones with filters, penalties and
    log-probabilities (each its own choose()): every row's ids and every generator as when each chooses alone."""
    from charrnn.decoding import BatchChoice, Decoding
    from charrnn.options import SamplingParams

    vocab = Vocab(list("\n abcdefgh"))
    sampler = Sampler(_model(vocab=len(vocab)), vocab, backend=backend)
    kinds = [dict(), dict(temperature=0.6), dict(top_k=3), dict(repetition_penalty=1.3), dict(logprobs=2),
             dict(temperature=0.0), dict(temperature=1.4), dict(min_p=0.2)]
    shapes = [(k, 1 + i % 3) for i, k in enumerate(kinds)]

    def decodings():
        return [Decoding(sampler, ["ab"] * n, 50, SamplingParams(seed=i, **k)) for i, (k, n) in enumerate(shapes)]

    together, alone = decodings(), decodings()
    assert [d.fused for d in together] == [backend == "native" and k in ({}, {"temperature": 0.6},
                                           {"temperature": 1.4}) for k, _ in shapes]
    choice = BatchChoice(together)
    rows = sum(n for _, n in shapes)
    for step in range(5):
        logits = torch.randn(rows, len(vocab)) * 3
        ids, at = choice(logits), 0
        for d, (_, n) in zip(alone, shapes):
            assert torch.equal(ids[at:at + n], d.choose(logits[at:at + n])), (step, d.params)
            at += n
    assert not choice.failed
    for a, b in zip(together, alone):
        assert a.steps_left == b.steps_left and torch.equal(a.generator.get_state(), b.generator.get_state())
