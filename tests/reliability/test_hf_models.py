"""A hostile user's Hugging Face model folders: damaged files, an encoder, a tokenizer of another model, no
tokenizer at all, beams as long as the context allows, and every numeric option on the HF paths."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import charrnn  # noqa: E402

from ..conftest import make_text  # noqa: E402
from ..hf_models import tiny_bert, tiny_gpt2  # noqa: E402
from .test_options import ADDRESS_SPACE, HOSTILE, refusal_problem, walk, walk_cases  # noqa: E402

pytestmark = pytest.mark.slow     # transformers takes seconds to import

TEXT = make_text(6000)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("hf") / "gpt", TEXT)


@pytest.fixture
def model(gpt, tmp_path):
    """A copy of the tiny GPT-2 folder, for a test to damage."""
    return shutil.copytree(gpt, tmp_path / "model")


def refusals(model, naming: str, corpus) -> list[str]:
    """What is wrong with `generate`, `eval` and `serve` of ``model``: each must exit 2 with one error line that
    names ``naming``, before it serves anything."""
    commands = (["generate", model, "--prompt", "the", "--length", 5], ["eval", model, "--corpus", corpus],
                ["serve", model, "--port", 0])
    cases = [(naming, [arg.replace("{", "{{").replace("}", "}}") for arg in map(str, argv)]) for argv in commands]
    results = walk(cases, {}, seconds=60)
    return [f"charrnn {' '.join(r['argv'])}: {problem}" for r in results
            if (problem := refusal_problem(r) or (None if r["code"] == 2 else "it ran"))]


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbled(path):
    path.write_bytes(b"\x00\xff" + path.read_bytes()[2:])


@pytest.mark.probe("hf-damaged-file")
@pytest.mark.parametrize("name, damage", [("tokenizer.json", _truncated), ("model.safetensors", _truncated),
                                          ("config.json", _garbled), ("tokenizer_config.json", _truncated)])
def test_a_damaged_file_of_a_model_folder_is_named_in_one_line(model, small_corpus, name, damage):
    damage(model / name)
    before = (model / name).read_bytes()
    problems = refusals(model, f"{model / name} is damaged", small_corpus)
    assert not problems, "\n".join(problems)
    assert (model / name).read_bytes() == before


@pytest.mark.probe("hf-damaged-file")
def test_weights_that_lack_a_tensor_are_refused_rather_than_filled_with_random_numbers(model, small_corpus):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    problems = refusals(model, "transformer.h.1.mlp.c_fc.weight", small_corpus)
    assert not problems, "\n".join(problems)


@pytest.mark.probe("hf-encoder")
def test_an_encoder_is_refused_and_a_causal_bert_generates(tmp_path, small_corpus):
    encoder = tiny_bert(tmp_path / "bert", TEXT)
    problems = refusals(encoder, "is a bert model, not a causal language model", small_corpus)
    assert not problems, "\n".join(problems)
    decoder = charrnn.load(tiny_bert(tmp_path / "bert-decoder", TEXT, decoder=True))
    assert len(decoder.generate("the quick", 20, seed=1)[0]) == len("the quick") + 20


@pytest.mark.probe("hf-tokenizer-ids")
def test_a_tokenizer_with_more_ids_than_the_model_embeds_is_refused_at_load(model, tmp_path, small_corpus):
    bigger = tiny_gpt2(tmp_path / "bigger", TEXT, vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bigger / name, model / name)
    problems = refusals(model, "tokens but its model embeds 300", small_corpus)
    assert not problems, "\n".join(problems)


@pytest.mark.probe("hf-no-tokenizer")
def test_a_folder_without_tokenizer_files_is_refused_at_load(model, small_corpus):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    problems = refusals(model, "has no tokenizer files (none of tokenizer.json", small_corpus)
    assert not problems, "\n".join(problems)


@pytest.mark.probe("hf-beam-length")
@pytest.mark.parametrize("length", [25, 40])
def test_beams_as_long_as_the_context_allows_score_their_own_tokens(gpt, monkeypatch, length):
    """A 128-token context holds 40 characters of beams after "to be" (about 1 token per character at worst
    here); the counting pass stops at the length, and every beam's score is the model's log-probability of its
    tokens."""
    import charrnn.beam

    lm = charrnn.load(gpt)
    searched, steps = [], []
    search, step = charrnn.beam.search, lm.sampler.stepper.step

    def recorded_search(*args, **kwargs):
        searched.append(search(*args, **kwargs))
        return searched[-1]

    def counted_step(*args):
        steps.append(1)
        return step(*args)

    monkeypatch.setattr(charrnn.beam, "search", recorded_search)
    monkeypatch.setattr(lm.sampler.stepper, "step", counted_step)
    beams = lm.sampler.beam("to be", length, 3)
    assert len(beams) == 3 and all(t.startswith("to be") and len(t) <= len("to be") + length for t, _ in beams)
    hyps = searched[0][0]
    tokens = max(len(h.ids) for h in hyps)
    assert len(steps) <= 3 * tokens          # the counting pass, the beams, and the greedy pass merged in
    prompt = lm.sampler.prompt_ids("to be")
    for (_, score), h in zip(beams, hyps):
        ids = torch.cat([prompt, torch.tensor(h.ids)])
        with torch.inference_mode():
            raw = lm.model(input_ids=(ids - 1)[None]).logits[0]
        logp = torch.log_softmax(lm.sampler.stepper.logits(raw), -1)
        own = sum(float(logp[p - 1, ids[p]]) for p in range(len(prompt), len(ids)))
        assert score == pytest.approx(own, abs=1e-3)


# --------------------------------------------------------------------------- the option walk on the HF paths


def walk_hf_in_child(folder: str) -> None:
    """Every numeric option of `generate`, `eval` and `serve` with every hostile value, on a tiny GPT-2 folder, in
    this (child) process under the walk's address-space limit; writes results.json into ``folder``."""
    import resource
    from pathlib import Path

    here = Path(folder)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))
    # --dynamic and --adapt, which turn the --dynamic-* options on for a run, are refused for a transformer.
    cases = [(flag, argv) for flag, argv in walk_cases(HOSTILE) if argv[0] in ("generate", "eval", "serve")
             and not {"--dynamic", "--adapt"} & set(argv)]
    results = walk(cases, dict(run=str(here / "gpt"), corpus=str(here / "small.txt")), seconds=120, backstop=True)
    (here / "results.json").write_text(json.dumps(results))


@pytest.mark.probe("option-walk-hf")
def test_every_numeric_option_on_a_hugging_face_model_with_hostile_values(gpt, small_corpus, tmp_path):
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    shutil.copytree(gpt, tmp_path / "gpt")
    assert small_corpus == tmp_path / "small.txt"
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.reliability.test_hf_models import "
                           "walk_hf_in_child; walk_hf_in_child(sys.argv[1])", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["argv"][0] for r in results} == {"generate", "eval", "serve"} and len(results) >= 30 * len(HOSTILE)
    problems = [f"charrnn {' '.join(r['argv'])}: {p}" for r in results if (p := refusal_problem(r))]
    assert not problems, "\n".join(problems)
    nan = [r for r in results if r["argv"][-1] in ("nan", "-1")]
    assert all(r["code"] == 2 for r in nan), [r["argv"] for r in nan if r["code"] != 2]
