"""Beam search (charrnn.beam) on toy decoders, and on the language model (Sampler.beam, generate --beam-width)."""

import itertools
import json

import pytest
import torch

from charrnn.beam import beam_search, greedy_search, search
from charrnn.cli import main
from charrnn.errors import CharRNNError
from charrnn.models.charlm import CharLM, ModelConfig
from charrnn.sampling import Sampler
from charrnn.vocab import Vocab

from .conftest import TINY_KW, make_text


class Toy:
    """A decoder whose next-token distribution depends on the whole history through its state
    (a hashed running sum), so a beam search that mixes up states gets the scores wrong."""

    def __init__(self, vocab: int, seed: int, eos: int | None = None, sharp: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(64, vocab, generator=g, dtype=torch.float64) * sharp
        self.eos = eos

    def step(self, ids, state):
        state = (state * 7 + ids + 1) % 64
        return torch.log_softmax(self.table[state], -1), state

    def score(self, seq, start=0, eos=True):
        """Total log-probability of ``seq`` (plus the end token) replayed step by step."""
        state, ids, total = torch.tensor([start]), torch.tensor([start]), 0.0
        toks = list(seq) + ([self.eos] if eos and self.eos is not None else [])
        for t in toks:
            lp, state = self.step(ids, state)
            total += float(lp[0, t])
            ids = torch.tensor([t])
        return total


def _start(batch):
    """Start ids and states: row b starts from id b and state b."""
    ids = torch.arange(batch)
    return ids, ids.clone()


@pytest.mark.parametrize("seed", range(5))
def test_width_one_equals_greedy(seed):
    toy = Toy(6, seed)
    ids, state = _start(4)
    greedy = greedy_search(toy.step, ids, state, 8)
    beams = beam_search(toy.step, ids, state, 8, 1)
    assert [[h.ids] for h in greedy] == [[h.ids for h in b] for b in beams]
    for g, (b,) in zip(greedy, beams):
        assert g.log_prob == pytest.approx(b.log_prob)


@pytest.mark.parametrize("seed", range(20))
def test_beams_are_sorted_distinct_scored_right_and_never_worse_than_greedy(seed):
    toy = Toy(5, seed, eos=4 if seed % 2 else None, sharp=1.0 + seed % 3)
    ids, state = _start(3)
    greedy = greedy_search(toy.step, ids, state, 7, eos_id=toy.eos)
    results = search(toy.step, ids, state, 7, 4, eos_id=toy.eos)
    for b, (g, hyps) in enumerate(zip(greedy, results)):
        scores = [h.log_prob for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.ids) for h in hyps}) == len(hyps) == 4
        assert scores[0] >= g.log_prob - 1e-9
        for h in hyps:  # the reported score is the sequence's real log-probability
            eos = toy.eos is not None and h.finished
            assert h.log_prob == pytest.approx(toy.score(h.ids, start=b, eos=eos), abs=1e-9)
            assert toy.eos not in h.ids


def test_wide_beam_finds_the_exact_best_sequence():
    toy = Toy(3, 7, sharp=1.5)
    length = 5
    best = max(itertools.product(range(3), repeat=length), key=lambda s: toy.score(s))
    (hyps,) = beam_search(toy.step, torch.tensor([0]), torch.tensor([0]), length, 3**length)
    assert tuple(hyps[0].ids) == best
    assert hyps[0].log_prob == pytest.approx(toy.score(best))
    assert len(hyps) == 3**length  # every sequence, once


def test_eos_ends_outputs_and_banned_tokens_never_appear():
    toy = Toy(5, 3, eos=4)
    (hyps,) = beam_search(toy.step, torch.tensor([0]), torch.tensor([0]), 12, 5, eos_id=4, banned=(0,))
    for h in hyps:
        assert 0 not in h.ids and 4 not in h.ids
        assert h.finished or len(h.ids) == 12


def test_bad_beam_width():
    toy = Toy(3, 0)
    with pytest.raises(CharRNNError, match="^beam_width"):  # the API names the field, the CLI the flag
        beam_search(toy.step, torch.tensor([0]), torch.tensor([0]), 3, 0)


# -- the language model ---------------------------------------------------------------------


def _sampler(arch="gru"):
    torch.manual_seed(0)
    vocab = Vocab(list("\n abcdefgh"))
    model = CharLM(ModelConfig(vocab_size=len(vocab), arch=arch, embed=8, hidden=16, layers=2))
    return Sampler(model, vocab)


def _lm_log_prob(sampler, prompt, text):
    ids = torch.from_numpy(sampler.vocab.encode(prompt + text).astype("int64"))[None]
    with torch.no_grad():
        logits, _ = sampler.model(ids)
    lp = torch.log_softmax(logits[0].double(), -1)
    n = len(prompt)
    return sum(float(lp[n - 1 + i, ids[0, n + i]]) for i in range(len(text)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_lm_beam_width_one_is_greedy_and_beams_beat_greedy(arch):
    s = _sampler(arch)
    greedy = s.generate("ab", 12, temperature=0)[0]
    (one, lp1), = s.beam("ab", 12, 1)
    assert one == greedy
    beams = s.beam("ab", 12, 5)
    assert len(beams) == 5
    scores = [lp for _, lp in beams]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] >= lp1 - 1e-6
    for text, lp in beams:
        assert text.startswith("ab") and len(text) == 14
        assert lp == pytest.approx(_lm_log_prob(s, "ab", text[2:]), abs=1e-4)


@pytest.mark.slow
def test_generate_beam_width_on_the_command_line(tmp_path, capsys):
    import charrnn

    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(5_000), encoding="utf-8")
    charrnn.train(str(corpus), tmp_path / "run", max_steps=20, progress=False, log=lambda m: None, **TINY_KW)
    code = main(["generate", str(tmp_path / "run"), "--prompt", "the ", "--length", "15", "--beam-width", "3",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    beams = json.loads(out)["beams"]
    assert len(beams) == 3 and all(b["text"].startswith("the ") and len(b["text"]) == 19 for b in beams)
    assert [b["log_prob"] for b in beams] == sorted((b["log_prob"] for b in beams), reverse=True)
    code = main(["generate", str(tmp_path / "run"), "--beam-width", "0"])
    assert code == 2 and "--beam-width must be a positive integer" in capsys.readouterr().err
