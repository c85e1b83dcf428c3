"""The model contract (charrnn.interfaces): every kind implements its protocols and declares capabilities that
match what it has; the sampler runs any Reader, so a new kind of model is a Reader and a few lines."""

import inspect
import types

import pytest
import torch

import charrnn
from charrnn import checkpoint as ckpt
from charrnn import runtime
from charrnn.api import LanguageModel
from charrnn.export import export_onnx
from charrnn.generator import Generator
from charrnn.interfaces import Capabilities, Completer, Described, Evaluator, Reader, TextGenerator
from charrnn.models import CharLM, ModelConfig
from charrnn.sampling import RunReader, Sampler
from charrnn.tokens import TextStream
from charrnn.vocab import Vocab

from .conftest import make_text

VOCAB = Vocab.from_text(make_text(2_000))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A randomly initialised run directory (what `charrnn export` and `charrnn.load` read)."""
    path = tmp_path_factory.mktemp("contract") / "run"
    torch.manual_seed(0)
    model = CharLM(ModelConfig(len(VOCAB), hidden=16, embed=8)).eval()
    path.mkdir()
    ckpt.write_config(path, {"model": model.config.to_dict(), "corpus": {"name": "test", "lowercase": False}})
    VOCAB.save(path / ckpt.VOCAB)
    ckpt.save_weights(path / ckpt.LATEST, model, 0)
    return path


def check_contract(lm) -> Capabilities:
    """``lm`` implements the protocols, and each capability flag says whether it has what the flag names."""
    caps = lm.capabilities
    assert isinstance(caps, Capabilities) and isinstance(type(lm).capabilities, Capabilities)
    assert isinstance(lm, TextGenerator) and isinstance(lm, Described)
    assert isinstance(lm.label, str) and lm.label and isinstance(lm.describe(), dict)
    assert isinstance(lm, Completer) == caps.complete
    assert isinstance(lm, Evaluator) == caps.evaluate
    assert callable(getattr(lm, "adapted", None)) == caps.dynamic
    if caps.evaluate:
        takes = inspect.signature(lm.evaluate).parameters
        assert ("window" in takes and "stride" in takes) == caps.windows
        assert ("dynamic" in takes) == caps.dynamic
    sampler = getattr(lm, "sampler", None)
    assert isinstance(sampler, Sampler) == caps.serve
    assert caps.beam_search <= caps.serve and caps.batchable <= caps.serve and caps.prompt_cache <= caps.serve
    if caps.serve:
        assert isinstance(sampler.reader, Reader)
        assert sampler.batchable == caps.batchable
        if not caps.prompt_cache:
            assert sampler.prompt_cache is None
    return caps


def test_a_run_fulfils_its_contract(run_dir):
    lm = charrnn.load(run_dir, weights="latest")
    caps = check_contract(lm)
    assert caps == LanguageModel.capabilities and not caps.torch_free and caps.int8 and caps.weights
    assert lm.label == lm.run.weights        # the weights file
    assert isinstance(lm.sampler.reader, RunReader)
    int8 = charrnn.load(run_dir, weights="latest", int8=True)
    assert check_contract(int8).batchable      # each row's activations are quantised on their own


def test_an_exported_file_fulfils_its_contract(run_dir, tmp_path):
    lm = runtime.load(export_onnx(run_dir, tmp_path / "m.onnx", weights="latest").path)
    caps = check_contract(lm)
    assert caps == Capabilities(torch_free=True)
    assert lm.label == "exported, fp32" and lm.describe()["kind"] == "onnx"
    assert lm.describe()["vocabulary"] == "".join(VOCAB.chars)


@pytest.mark.slow
def test_a_hugging_face_model_fulfils_its_contract(tmp_path):
    pytest.importorskip("transformers")
    from charrnn.hf import PretrainedModel, PretrainedReader

    from .hf_models import tiny_gpt2

    lm = charrnn.load(tiny_gpt2(tmp_path / "gpt", make_text(3000)))
    caps = check_contract(lm)
    assert caps == PretrainedModel.capabilities and caps.windows and not (caps.dynamic or caps.batchable or caps.int8)
    assert lm.label == "Hugging Face gpt2"
    assert isinstance(lm.sampler.reader, PretrainedReader) and type(lm.sampler) is Sampler


def test_a_sampler_given_a_run_reader_is_the_sampler_of_a_model_and_vocabulary():
    torch.manual_seed(1)
    model = CharLM(ModelConfig(len(VOCAB), hidden=16, embed=8))
    a, b = Sampler(model, VOCAB), Sampler(RunReader(model, VOCAB))
    assert a.generate("the ", 40, seed=3) == b.generate("the ", 40, seed=3)
    assert a.beam("the ", 10, 3) == b.beam("the ", 10, 3)
    a.prompt_cache = cache = object()
    assert a.reader.prompt_cache is cache


# -- a new kind of model, from the contract alone ------------------------------------------------------------

class CycleReader:
    """A made-up model that always predicts the character after the last one read, cyclically: a Reader."""

    batchable = True
    prompt_cache = None

    def __init__(self, chars: str):
        self.vocab = Vocab.from_text(chars)
        n = len(self.vocab)
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=n))
        self.device = torch.device("cpu")
        table = torch.full((n, n), -10.0)
        for i in range(1, n):
            table[i, i % (n - 1) + 1] = 10.0        # [UNK] (0) never follows
        self.stepper = types.SimpleNamespace(step=lambda ids, state: (table[ids], ids), backend="python")

    def encode_prompt(self, prompt):
        return self.prompt_ids(prompt), self.vocab.unknown(prompt)

    def healed(self, prompt):
        return self.prompt_ids(prompt), b""

    def prompt_ids(self, prompt):
        return torch.from_numpy(self.vocab.encode(prompt or "a").astype("int64"))

    def prime(self, prompts):
        last = torch.stack([self.prompt_ids(p)[-1] for p in prompts])
        return self.stepper.step(last, None)

    def token_text(self, i):
        return self.vocab.token_bytes[i].decode()

    def text_stream(self, prompts, length):
        return TextStream(self.vocab.token_bytes, len(prompts), length)

    def check_fits(self, option, value, rows, length=0):
        pass


class CycleModel(Generator):
    capabilities = Capabilities(complete=True, beam_search=True, serve=True, batchable=True)
    label = "cyclic"

    def __init__(self, chars: str):
        self.sampler = Sampler(CycleReader(chars))
        self.vocab = self.sampler.vocab

    def describe(self) -> dict:
        return {"kind": "cycle", "vocabulary": "".join(self.vocab.chars)}


def test_a_new_kind_is_a_reader_and_a_generator():
    lm = CycleModel("abcd")
    check_contract(lm)
    assert lm.generate("b", 6, temperature=0) == ["bcdabcd"]
    assert lm.generate(["a", "c"], 3, temperature=0) == ["abcd", "cdab"]
    assert [c.finish_reason for c in lm.complete("a", 10, temperature=0, stop=("da",))] == ["stop"]
    assert lm.complete("a", 10, temperature=0, stop=("da",))[0].text == "abc"
    assert list(lm.stream("d", 3, temperature=0)) == [["a"], ["b"], ["c"]]
    assert lm.sampler.beam("a", 3, 2)[0] == ("abcd", pytest.approx(0.0, abs=1e-6))
    assert lm.unknown_chars("abz") == ["z"]
