"""Word and BPE vocabularies: exact round trips, [UNK] at 0, streaming decode, files checked on load."""

import json

import numpy as np
import pytest

from charrnn.errors import CharRNNError
from charrnn.tokens import TextStream, TokenVocab

from .conftest import make_text

HOSTILE = "Tabs\there,  runs   of spaces;\r\nCRLF lines\r\nünïcödé — 日本語のテキスト 🙂🙃!\n\n\tend...  "


@pytest.fixture(scope="module", params=["word", "bpe"])
def vocab(request):
    return TokenVocab.train(request.param, make_text(20_000) + "\n" + HOSTILE, 400)


def test_decoding_the_encoded_text_gives_the_text_back(vocab):
    text = make_text(5_000, seed=3) + "\n" + HOSTILE
    ids = vocab.encode(text)
    assert ids.dtype == vocab.dtype and len(ids) < len(text)
    if vocab.kind == "word":
        assert (ids != 0).all()                   # every token was seen in training
    assert vocab.decode(ids) == text
    assert len(vocab) <= 400 and vocab.token_bytes[0] == b""


def test_bpe_knows_every_text_and_word_reads_the_unseen_as_unk(vocab):
    unseen = "Zyxwvut ΩΨΧ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = vocab.encode(unseen)
    if vocab.kind == "bpe":
        assert (ids != 0).all() and vocab.decode(ids) == unseen
    else:
        assert (ids == 0).sum() == 3 and vocab.decode(ids) == "  "


def test_max_vocab_keeps_the_most_frequent_tokens():
    text = "the " * 50 + "cat " * 20 + "sat " * 5 + "on mat"
    vocab = TokenVocab.train("word", text, 4)                 # [UNK], " ", "the", "cat"
    assert len(vocab) == 4
    assert vocab.decode(vocab.encode("the cat sat")) == "the cat "


def test_streaming_decodes_whole_characters_as_they_complete(vocab):
    text = "日本語のテキスト 🙂🙃! the quick brown fox"
    ids = vocab.encode(text)
    stream = TextStream(vocab.token_bytes, rows=1, length=len(text))
    pieces = [stream.push([i])[0] for i in ids]
    assert stream.done
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_saved_vocabularies_load_and_a_foreign_tokenizer_file_is_refused(vocab, tmp_path):
    vocab.save(tmp_path / "vocab.json")
    meta = json.loads((tmp_path / "vocab.json").read_text())
    again = TokenVocab.load(tmp_path / "vocab.json", meta)
    assert np.array_equal(again.encode(HOSTILE), vocab.encode(HOSTILE))
    other = TokenVocab.train(vocab.kind, "a different text entirely " * 30, 50)
    (tmp_path / "tokenizer.json").write_text(other.tokenizer.to_str())
    with pytest.raises(CharRNNError, match="not the one this run was trained with"):
        TokenVocab.load(tmp_path / "vocab.json", meta)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CharRNNError, match="cannot be read"):
        TokenVocab.load(tmp_path / "vocab.json", meta)


@pytest.fixture(scope="module")
def sampler(vocab):
    import torch

    from charrnn.models import CharLM, ModelConfig
    from charrnn.sampling import Sampler

    torch.manual_seed(0)
    return Sampler(CharLM(ModelConfig(vocab_size=len(vocab), hidden=16, embed=8)), vocab)


@pytest.mark.parametrize("length", [1, 7, 50])
def test_length_counts_characters_and_a_seed_repeats_the_text(sampler, length):
    texts = sampler.generate("the qu", length=length, num_samples=3, seed=4)
    assert all(t.startswith("the qu") and len(t) == len("the qu") + length for t in texts)
    assert texts == sampler.generate("the qu", length=length, num_samples=3, seed=4)
    streamed = ["the qu" + "".join(p) for p in zip(*sampler.stream(["the qu"] * 3, length, seed=4))]
    assert streamed == texts


def test_a_prompt_ending_inside_a_token_is_healed(sampler, vocab):
    ids, tail = sampler.healed("the quick brown fo")
    assert tail and vocab.decode(ids) + tail.decode() == "the quick brown fo"
    prompt = "the quick brown fo"
    first = next(sampler.stream_ids([prompt] * 8, 1, temperature=1.5, seed=0)).tolist()
    assert all(vocab.token_bytes[i].startswith(tail) for i in first)      # whatever the model prefers
    texts = sampler.generate(prompt, length=30, num_samples=8, temperature=1.5, seed=0)
    for text, i in zip(texts, first):
        assert text.startswith(prompt[: -len(tail.decode())] + vocab.token_bytes[i].decode("utf-8", "replace").rstrip("\ufffd"))


def test_beam_search_gives_texts_of_the_asked_length(sampler):
    beams = sampler.beam("the quick ", 20, 3)
    assert len(beams) == 3 and all(t.startswith("the quick ") and len(t) <= len("the quick ") + 20 for t, _ in beams)
    assert len(beams[0][0]) == len("the quick ") + 20
    assert beams[0][1] >= beams[-1][1]
