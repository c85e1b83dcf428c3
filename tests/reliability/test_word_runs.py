"""Word runs whose vocabulary leaves words out: bits/char over the text the model predicts, the rest counted apart.

The corpus is random letters, so the words are unknown to a vocabulary of a few ids and no model can predict
their letters; what separates them (a space or a newline, at random) is worth one bit a character.  A figure
that counted the unknown words as characters the model predicted made this text look almost free.
"""

import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from charrnn.config import ModelConfig
from charrnn.data import split_train_val
from charrnn.evaluation import evaluate
from charrnn.models.charlm import CharLM
from charrnn.ops.sampled_softmax import full_softmax_loss, sampled_softmax_loss
from charrnn.tokens import WORD_PATTERN, TokenVocab
from charrnn.training import unigram_proposal
from charrnn.vocab import UNK_ID

from ..conftest import TINY, cli, make_text

TRAIN = ["--tokenizer", "word", "--max-steps", 60, "--eval-every", 30, "--lr", "3e-3", "--sample-every", 0, *TINY]


def random_letters(n_chars: int, seed: int = 0) -> str:
    """Words of 3 to 7 random letters, each followed by a space or a newline at random."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
        parts.append(word + rng.choice(" \n"))
        size += len(parts[-1])
    return "".join(parts)


def unscored_share(text: str, known: set[str]) -> float:
    """The share of the validation split's target characters (all but the first token's) inside tokens outside
    ``known``, counted with the tokenizer's own pattern on the text."""
    val = text[len(split_train_val(np.zeros(len(text)), 0.1)[0]):]
    tokens = re.findall(WORD_PATTERN, val)
    first = len(tokens[0]) if tokens[0] in known else 0       # the first token is no target
    return sum(len(t) for t in tokens if t not in known) / (len(val) - first)


@pytest.mark.probe("word-unk-bits-per-char")
def test_unk_targets_are_left_out_of_the_loss_and_their_characters_counted_apart():
    from charrnn.tokenized import target_chars, unknown

    text = "\n" + random_letters(4000)
    vocab = TokenVocab.train("word", text, 3)            # [UNK], a space and a newline: every word is [UNK]
    ids = vocab.encode(text)
    chars = target_chars(vocab, ids, len(text))
    unk_tokens, unk_chars = unknown(vocab, ids[1:], chars)
    assert chars == len(text) - 1 and unk_tokens == len(text.split()) > 0
    assert unk_chars == len(re.sub(r"\s", "", text))    # the letters

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=len(vocab), hidden=16, embed=8)).eval()
    r = evaluate(model, ids, n_streams=1, chars=chars, unk_chars=unk_chars)
    with torch.no_grad():                                  # the reference: one pass, [UNK] targets skipped by hand
        logits, _ = model(torch.from_numpy(ids[None, :-1].astype(np.int64)))
    nats = -torch.log_softmax(logits[0].double(), -1).gather(1, torch.from_numpy(ids[1:, None].astype(np.int64)))
    scored = ids[1:] != UNK_ID
    assert r["tokens"] == scored.sum() and r["chars"] == chars - unk_chars
    assert r["bpc"] == pytest.approx(float(nats[scored].sum()) / (chars - unk_chars) / math.log(2), rel=1e-5)
    assert r["loss"] == pytest.approx(float(nats[scored].mean()), rel=1e-5)
    assert (r["unk_tokens"], r["unk_chars"], r["unk_share"]) == (unk_tokens, unk_chars, unk_chars / chars)


@pytest.fixture(scope="module")
def letters_run(tmp_path_factory):
    """A word run of two ids ([UNK] and one whitespace token) on random letters, and its corpus's text."""
    from charrnn.cli import main

    tmp = tmp_path_factory.mktemp("letters")
    corpus = tmp / "letters.txt"
    corpus.write_text(random_letters(12_000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(tmp / "home"))
        assert main(["train", str(corpus), "--out", str(tmp / "run"), "--max-vocab", "2", *map(str, TRAIN)]) == 0
    return tmp / "run", corpus


@pytest.mark.slow
@pytest.mark.probe("word-unk-bits-per-char")
def test_eval_of_a_two_id_vocabulary_on_random_letters_is_not_near_zero_and_says_what_it_left_out(
        capsys, letters_run):
    run, corpus = letters_run
    text = corpus.read_text(encoding="utf-8")
    code, out, err = cli(capsys, "eval", run, "--json")
    assert code == 0, err
    r = json.loads(out)
    train = text[:len(split_train_val(np.zeros(len(text)), 0.1)[0])]
    known = {Counter(re.findall(WORD_PATTERN, train)).most_common(1)[0][0]}      # " " or "\n"
    # What is scored is whether a space or a newline follows a word: one bit, which a model cannot beat
    # (it was 0.2 bits/char when the unknown words counted as predicted characters).
    assert r["bpc"] > 0.8, r
    assert r["unk_share"] == pytest.approx(unscored_share(text, known), abs=1e-12) and r["unk_share"] > 0.8
    code, out, err = cli(capsys, "eval", run)
    assert code == 0, err
    assert f"; {r['unk_share']:.1%} of the characters ({r['unk_chars']:,}) lie in {r['unk_tokens']:,} [UNK] tokens " \
           "and are not scored" in out, out


@pytest.mark.slow
@pytest.mark.probe("word-unk-bits-per-char")
def test_training_reports_the_figure_eval_prints_and_logs_bits_per_char_the_same_way(capsys, letters_run):
    from charrnn.report import read_metrics

    run, _ = letters_run
    code, out, err = cli(capsys, "eval", run, "--json")
    assert code == 0, err
    r = json.loads(out)
    metrics = read_metrics(run)
    assert metrics["train"][-1]["bpc"] > 0.8            # the training loss's bits/char leave [UNK] out too
    best = min(metrics["val"], key=lambda m: m["val_loss"])
    assert best["val_bpc"] == pytest.approx(r["bpc"], rel=1e-9) and best["val_loss"] == pytest.approx(r["loss"])
    assert best["val_unk_share"] == r["unk_share"]


@pytest.mark.probe("word-sampled-softmax")
def test_the_sampled_softmax_estimates_the_full_one_when_unk_is_a_frequent_target():
    g = torch.Generator().manual_seed(0)
    v, h, n = 40, 16, 512
    train_ids = torch.multinomial((1 / torch.arange(1, v + 1).double()).float(), 20_000, True, generator=g)
    q = unigram_proposal(train_ids.numpy(), v)              # id 0, [UNK], the most frequent
    counts = np.bincount(train_ids.numpy(), minlength=v) + 1
    assert torch.allclose(q, torch.from_numpy(counts / counts.sum()).float())
    targets = torch.multinomial(q, n, True, generator=g)
    assert (targets == UNK_ID).sum() > n // 10
    weight, bias = (torch.randn(v, h, generator=g) * 0.5).requires_grad_(), torch.log(q).requires_grad_()
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    params = [weight, bias, hidden]

    def grads(loss):
        assert torch.isfinite(loss)
        return torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])

    full = grads(full_softmax_loss(hidden, weight, bias, targets))
    mean = sum(grads(sampled_softmax_loss(hidden, weight, bias, targets, q, 8, g)) for _ in range(50)) / 50
    assert torch.nn.functional.cosine_similarity(mean, full, dim=0) > 0.9


@pytest.mark.slow
@pytest.mark.probe("word-sampled-softmax")
def test_a_capped_word_vocabulary_trains_with_a_sampled_softmax(capsys, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", corpus, "--out", run, "--max-vocab", 12, "--sampled-softmax", 6, *TRAIN)
    assert code == 0, err
    code, out, err = cli(capsys, "eval", run, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["unk_share"] > 0.2 and math.isfinite(r["bpc"])
    # Learned: below the uniform guess over the 11 ids a target can be, log(11) = 2.4 nats/token.
    assert r["loss"] < math.log(11) - 0.5, r


@pytest.mark.probe("word-sampled-softmax")
def test_a_loss_that_is_nan_at_the_first_step_is_not_called_a_divergence(capsys, small_corpus, tmp_path,
                                                                             monkeypatch):
    from charrnn import training

    def no_unk(ids, size):           # the old proposal: [UNK], a target of a capped vocabulary, never drawn
        q = unigram_proposal(ids, size)
        q[UNK_ID] = 0
        return q / q.sum()

    monkeypatch.setattr(training, "unigram_proposal", no_unk)
    code, _, err = cli(capsys, "train", small_corpus, "--out", tmp_path / "run", "--tokenizer", "word",
                       "--max-vocab", 12, "--sampled-softmax", 6, "--max-steps", 3, *TINY)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the loss was nan at the first step, before any update") and "--lr" not in line


@pytest.mark.probe("word-unk-bits-per-char")
def test_a_validation_text_of_unknown_words_only_is_refused_before_anything_is_written(capsys, tmp_path):
    corpus = tmp_path / "text.txt"                   # trained on "x x x ...": [UNK] and "x"; validated on other words
    corpus.write_text("x " * 4000 + "\n" + "\n".join(random_letters(1200).split()), encoding="utf-8")
    code, _, err = cli(capsys, "train", corpus, "--out", tmp_path / "run", "--max-vocab", 2, *map(str, TRAIN))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no target of it is scored" in lines[0] and "--max-vocab" in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.probe("word-unk-bits-per-char")
def test_eval_of_a_text_of_unknown_words_only_says_so_in_one_line(capsys, letters_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("qwerty-uiop;asdf", encoding="utf-8")         # no space, no newline: every token is [UNK]
    code, out, err = cli(capsys, "eval", letters_run[0], "--corpus", other)
    assert code == 2 and out == "" and err.strip() == ("error: every token of the text is [UNK] (outside the run's "
                                                       "vocabulary): nothing to score; evaluate on text in the run's "
                                                       "own words"), err
