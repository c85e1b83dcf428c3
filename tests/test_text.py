"""The text layer: vocabulary, reading files and named corpora, the encoded cache."""

import hashlib
import urllib.request

import numpy as np
import pytest

from charrnn.corpus import NAMED_CORPORA, corpora_status, load_corpus, read_text, resolve_corpus_files
from charrnn.errors import CharRNNError
from charrnn.vocab import UNK_ID, Vocab

from .conftest import SHARED_DATA


def test_vocab_is_sorted_chars_after_unk_and_round_trips():
    v = Vocab.from_text("hello, world")
    assert v.chars == sorted(set("hello, world"))
    assert len(v) == len(set("hello, world")) + 1
    ids = v.encode("hello")
    assert ids.min() > 0 and v.decode(ids) == "hello"
    assert v.encode("hé")[1] == UNK_ID
    assert v.unknown_chars("hé!") == ["!", "é"]
    assert Vocab.from_json(v.to_json()).chars == v.chars


def test_vocab_handles_non_ascii_and_astral_characters():
    text = "naïve café 😀 ünïcödé"
    v = Vocab.from_text(text)
    assert v.decode(v.encode(text)) == text


def test_file_is_encoded_and_cached(tmp_path, charrnn_home):
    path = tmp_path / "a.txt"
    path.write_text("abcabc\nxyz", encoding="utf-8")
    c = load_corpus(str(path))
    assert c.vocab.decode(c.ids) == "abcabc\nxyz"
    assert c.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert c.ids.dtype == np.uint8 and isinstance(c.ids, np.memmap)
    cached = list((charrnn_home / "encoded").iterdir())
    assert len(cached) == 1
    # A second load reads the cache (it is not re-encoded: the cache file stays the same object).
    before = (cached[0] / "ids.npy").stat().st_mtime_ns
    load_corpus(str(path))
    assert (cached[0] / "ids.npy").stat().st_mtime_ns == before


def test_directory_concatenates_txt_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first ", encoding="utf-8")
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    assert read_text(str(tmp_path)) == "first second"


def test_normalisation_options(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Hello\nWorld", encoding="utf-8")
    assert read_text(str(path), lowercase=True, newlines_to_spaces=True) == "hello world"
    c = load_corpus(str(path), lowercase=True, newlines_to_spaces=True)
    assert c.vocab.decode(c.ids) == "hello world"


def test_utf8_errors_name_the_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(CharRNNError, match="byte offset 6"):
        load_corpus(str(path))


def test_utf8_sequences_split_across_chunks_are_fine(tmp_path, monkeypatch):
    import charrnn.corpus as corpus

    monkeypatch.setattr(corpus, "CHUNK_BYTES", 3)
    path = tmp_path / "u.txt"
    path.write_text("aé😀bü", encoding="utf-8")
    assert read_text(str(path)) == "aé😀bü"
    path.write_bytes("aé😀".encode() + b"\xc3")
    with pytest.raises(CharRNNError, match="byte offset 7"):
        read_text(str(path))


def test_empty_corpus_and_missing_path(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CharRNNError, match="empty"):
        load_corpus(str(empty))
    with pytest.raises(CharRNNError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_unknown_named_corpus_lists_the_known_ones():
    with pytest.raises(CharRNNError, match="nietzsche, shakespeare"):
        resolve_corpus_files("tolstoy")


def test_named_corpus_from_charrnn_data(monkeypatch):
    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        pytest.skip("shared data not available")
    monkeypatch.setenv("CHARRNN_DATA", str(SHARED_DATA))
    c = load_corpus("shakespeare", progress=False)
    assert len(c) == 1_115_394
    assert len(c.vocab) == 66
    assert c.sha256 == NAMED_CORPORA["shakespeare"].sha256
    rows = {r["name"]: r for r in corpora_status()}
    assert rows["shakespeare"]["available"] and rows["nietzsche"]["available"]


def test_named_corpus_cache_comes_before_charrnn_data(tmp_path, monkeypatch, charrnn_home):
    if not (SHARED_DATA / "nietzsche.txt").exists():
        pytest.skip("shared data not available")
    (charrnn_home / "corpora").mkdir()
    (charrnn_home / "corpora" / "nietzsche.txt").write_bytes((SHARED_DATA / "nietzsche.txt").read_bytes())
    monkeypatch.setenv("CHARRNN_DATA", str(tmp_path))  # empty directory
    name, files = resolve_corpus_files("nietzsche")
    assert files == [charrnn_home / "corpora" / "nietzsche.txt"]


def test_named_corpus_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare", encoding="utf-8")
    monkeypatch.setenv("CHARRNN_DATA", str(tmp_path))
    with pytest.raises(CharRNNError, match="sha256"):
        resolve_corpus_files("shakespeare")


def test_offline_download_gives_a_clear_error(monkeypatch, charrnn_home):
    def refuse(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(CharRNNError, match="CHARRNN_DATA") as e:
        resolve_corpus_files("shakespeare", progress=False)
    assert "shakespeare.txt" in str(e.value)
    assert not list((charrnn_home / "corpora").glob("*"))  # no partial file left


def test_download_checks_integrity_and_caches(monkeypatch, charrnn_home):
    import io

    payload = b"fake corpus"

    class Resp(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Resp(payload))
    with pytest.raises(CharRNNError, match="integrity"):
        resolve_corpus_files("shakespeare", progress=False)
    good = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(NAMED_CORPORA, "shakespeare",
                        NAMED_CORPORA["shakespeare"].__class__(**{**NAMED_CORPORA["shakespeare"].__dict__,
                                                                  "sha256": good}))
    _, files = resolve_corpus_files("shakespeare", progress=False)
    assert files[0] == charrnn_home / "corpora" / "tinyshakespeare.txt"
    assert files[0].read_bytes() == payload
