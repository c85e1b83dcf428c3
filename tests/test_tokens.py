"""Word and BPE vocabularies: exact round trips, [UNK] at 0, streaming decode, files checked on load."""

import json

import numpy as np
import pytest

from charrnn.errors import CharRNNError
from charrnn.tokens import StreamDecoder, TokenVocab

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
    stream = StreamDecoder(vocab.token_bytes, rows=1)
    pieces = [stream.push([i])[0] for i in ids] + stream.flush()
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
