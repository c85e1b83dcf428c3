"""Models and sampling: parameter counts, the one-step cell against the fused kernel, logits processors."""

import math

import pytest
import torch

from charrnn.errors import CharRNNError
from charrnn.models import CharLM, ModelConfig
from charrnn.decoding import choose, process_logits
from charrnn.options import check_sampling_options
from charrnn.sampling import Sampler
from charrnn.stepper import Stepper
from charrnn.vocab import UNK_ID, Vocab


def test_default_model_has_the_tutorials_parameter_count():
    model = CharLM(ModelConfig(vocab_size=66))
    assert model.num_parameters() == 4_022_850
    assert "4,022,850" in model.summary()


def test_untrained_loss_is_about_ln_vocab():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=66, hidden=256))
    x = torch.randint(1, 66, (8, 50))
    logits, _ = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 66), torch.randint(1, 66, (400,)))
    assert abs(loss.item() - math.log(66)) < 0.1


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("layers,embed", [(1, 8), (3, 0)])
def test_stepper_matches_the_fused_forward(arch, layers, embed):
    torch.manual_seed(1)
    model = CharLM(ModelConfig(vocab_size=20, arch=arch, embed=embed, hidden=24, layers=layers)).eval()
    ids = torch.randint(0, 20, (3, 12))
    with torch.no_grad():
        want, want_state = model(ids)
        stepper = Stepper(model)
        state = stepper.from_module_state(model.zero_state(3))
        got = []
        for t in range(12):
            logits, state = stepper.step(ids[:, t], state)
            got.append(logits)
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=1e-4)
    final = stepper.to_module_state(state)
    if arch == "lstm":
        torch.testing.assert_close(final[0], want_state[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(final[1], want_state[1], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(final, want_state, atol=1e-5, rtol=1e-4)


def test_top_k_and_top_p_filter_the_right_characters():
    logits = torch.log(torch.tensor([[0.0001, 0.5, 0.3, 0.15, 0.0499]]))
    k2 = process_logits(logits.clone(), 1.0, top_k=2)
    assert torch.isfinite(k2).tolist() == [[False, True, True, False, False]]
    p = process_logits(logits.clone(), 1.0, top_p=0.75)  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(p).tolist() == [[False, True, True, False, False]]
    p = process_logits(logits.clone(), 1.0, top_p=0.1)  # always keeps the most likely
    assert torch.isfinite(p).tolist() == [[False, True, False, False, False]]
    assert torch.isfinite(process_logits(logits.clone(), 1.0, top_p=1.0)).sum() == 4  # only [UNK] removed


def test_unk_is_never_chosen_even_when_most_likely():
    logits = torch.tensor([[10.0, 0.0, 0.0]]).repeat(1000, 1)
    g = torch.Generator().manual_seed(0)
    assert (choose(logits, 1.0, None, None, g) != UNK_ID).all()
    assert (choose(logits, 0.0, None, None, g) != UNK_ID).all()


def test_temperature_zero_is_greedy_and_low_temperature_sharpens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    assert choose(logits, 0.0, None, None, None).item() == 2
    g = torch.Generator().manual_seed(0)
    picks = choose(logits.repeat(2000, 1), 0.05, None, None, g)
    assert (picks == 2).float().mean() > 0.99


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(length=-1), "length"), (dict(num_samples=0), "num_samples"),
])
def test_bad_sampling_options(kw, match):
    with pytest.raises(CharRNNError, match="^" + match):  # the API names the field, the CLI the flag
        check_sampling_options(**kw)


def _sampler():
    torch.manual_seed(0)
    vocab = Vocab(list("\n abcdefgh"))
    model = CharLM(ModelConfig(vocab_size=len(vocab), embed=8, hidden=16, layers=2))
    return Sampler(model, vocab)


def test_same_seed_same_text_and_samples_differ():
    s = _sampler()
    a = s.generate("abc", 50, num_samples=3, seed=7)
    b = s.generate("abc", 50, num_samples=3, seed=7)
    assert a == b
    assert len(set(a)) == 3 and all(t.startswith("abc") and len(t) == 53 for t in a)
    assert s.generate("abc", 50, num_samples=3, seed=8) != a


def test_generate_is_the_prompt_and_the_stream():
    """generate() reads the ids back once at the end; stream() a character at a time: the same text."""
    s = _sampler()
    for prompts, kw in ((["abc"] * 3, dict(temperature=0.9)), (["a", "bcd"], dict(top_k=3)), (["ab"], dict(temperature=0))):
        pieces = list(prompts)
        for step in s.stream(prompts, 40, seed=5, **kw):
            pieces = [p + ch for p, ch in zip(pieces, step)]
        assert s.generate(prompts, 40, seed=5, **kw) == pieces
    assert s.generate(["ab", "c"], 0) == ["ab", "c"]


def test_samples_are_generated_in_one_batch(monkeypatch):
    s = _sampler()
    calls = []
    real = Stepper.step

    def spy(self, ids, state):
        calls.append(ids.shape[0])
        return real(self, ids, state)

    monkeypatch.setattr(Stepper, "step", spy)
    s.generate("ab", 20, num_samples=5, seed=1)
    assert calls == [5] * 19  # one batched step per character after the first


def test_unknown_prompt_characters_map_to_unk():
    s = _sampler()
    ids, unknown = s.encode_prompt("aZb")
    assert ids.tolist()[1] == UNK_ID and unknown == ["Z"]
    text = s.generate("aZb", 30, seed=0)[0]
    assert text.startswith("aZb")


def test_greedy_generation_is_deterministic_without_seed():
    s = _sampler()
    assert s.generate("a", 40, temperature=0)[0] == s.generate("a", 40, temperature=0)[0]


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_int8_stepper_stays_close_to_fp32(arch):
    torch.manual_seed(2)
    model = CharLM(ModelConfig(vocab_size=30, arch=arch, embed=16, hidden=64, layers=2)).eval()
    ids = torch.randint(0, 30, (4, 20))
    fp32, int8 = Stepper(model), Stepper(model, "int8")
    state = fp32.from_module_state(model.zero_state(4))
    with torch.no_grad():
        for t in range(19):  # a realistic state, then one step of each from the same state
            _, state = fp32.step(ids[:, t], state)
        a, _ = fp32.step(ids[:, 19], state)
        b, _ = int8.step(ids[:, 19], state)
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.01
    assert not torch.equal(a, b)  # it really ran in int8
    with pytest.raises(CharRNNError, match="int8"):
        Stepper(model, "int4")


def test_repetition_penalty_counts_the_prompt_and_each_sample_alone():
    """CTRL's penalty on a character model: 1 changes nothing; a large one makes greedy text stop repeating
    any character the prompt or the sample already holds, while a vocabulary's worth of fresh ones last."""
    s = _sampler()
    assert s.generate("abc", 30, temperature=0, repetition_penalty=1.0) == s.generate("abc", 30, temperature=0)
    texts = s.generate(["ab", "c"], len(s.vocab) - 4, temperature=0, repetition_penalty=1e6)
    for prompt, text in zip(["ab", "c"], texts):
        new = text[len(prompt):]
        assert len(set(new)) == len(new) and not set(new) & set(prompt), text
    seeded = s.generate("abc", 40, num_samples=3, seed=4, repetition_penalty=1.5)
    assert seeded == s.generate("abc", 40, num_samples=3, seed=4, repetition_penalty=1.5)
    assert seeded != s.generate("abc", 40, num_samples=3, seed=4)
