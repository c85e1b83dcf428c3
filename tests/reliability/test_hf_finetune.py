"""A hostile user's fine-tuning of a Hugging Face model: damaged model files, a tokenizer of another model, `--lora`
empty, zero, negative, NaN, a word, past the model's width; a fine-tuned run whose model folder is damaged or
whose LoRA base changed.  Training is refused in one line naming the option, before the new run's folder exists;
loading a damaged run is one line."""

import json
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import charrnn  # noqa: E402
from charrnn import checkpoint as ckpt  # noqa: E402

from ..conftest import cli, make_text  # noqa: E402
from ..hf_models import tiny_gpt2  # noqa: E402
from .test_corpora import one_line_error  # noqa: E402

pytestmark = pytest.mark.slow     # transformers takes seconds to import

FAST = dict(seq_len=32, batch_size=4, precision="fp32", sample_every=0, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_finetune_hostile")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_text(8000), encoding="utf-8")
    gpt = tiny_gpt2(tmp / "gpt", make_text(8000))
    return {"tmp": tmp, "corpus": corpus, "gpt": gpt}


def _copy(gpt, tmp_path, name):
    return shutil.copytree(gpt, tmp_path / name)


@pytest.mark.probe("hf-finetune-hostile")
def test_hostile_sources_and_ranks_are_one_line_and_write_nothing(setup, tmp_path, capsys):
    gpt = setup["gpt"]
    damaged_weights = _copy(gpt, tmp_path, "weights")
    (damaged_weights / "model.safetensors").write_bytes(b"\0" * 64)
    damaged_tokenizer = _copy(gpt, tmp_path, "tokenizer")
    (damaged_tokenizer / "tokenizer.json").write_text("{not json")
    other_tokenizer = _copy(gpt, tmp_path, "other")        # a tokenizer with more ids than the model embeds
    tiny_gpt2(tmp_path / "bigger", make_text(8000), vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "bigger" / name, other_tokenizer / name)
    cases = [(["--init-from", path], "--init-from") for path in (damaged_weights, damaged_tokenizer, other_tokenizer)]
    cases += [(["--init-from", gpt, "--lora", rank], "--lora") for rank in ("", "0", "-3", "nan", "four", "100000")]
    for i, (args, naming) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, _, err = cli(capsys, "train", setup["corpus"], "--out", out, "--max-steps", "1", *args)
        one_line_error(code, err, naming)
        assert not out.exists(), args


@pytest.mark.probe("hf-finetune-hostile")
def test_a_damaged_fine_tuned_run_is_one_line(setup, tmp_path, capsys):
    base = _copy(setup["gpt"], tmp_path, "base")
    full, lora = tmp_path / "full", tmp_path / "lora"
    charrnn.train(str(setup["corpus"]), full, init_from=str(base), max_steps=2, **FAST)
    charrnn.train(str(setup["corpus"]), lora, init_from=str(base), lora=2, max_steps=2, **FAST)
    (full / ckpt.HF_FOLDER / "model.safetensors").write_bytes(b"\0" * 64)
    adapter = lora / ckpt.HF_FOLDER / "adapter_config.json"
    good_adapter = adapter.read_text()
    adapter.write_text(json.dumps([1, 2]))
    for run, says in ((full, "model.safetensors"), (lora, "adapter_config.json")):
        code, _, err = cli(capsys, "generate", run, "--length", "5")
        one_line_error(code, err, says)
    adapter.write_text(good_adapter)
    assert cli(capsys, "generate", lora, "--length", "5")[0] == 0
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    code, _, err = cli(capsys, "generate", lora, "--length", "5")
    one_line_error(code, err, "changed")
