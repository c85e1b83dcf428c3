"""Fine-tuning a Hugging Face causal LM (charrnn/hf_training.py) on a tiny GPT-2 built here: every weight, and
LoRA adapters through peft.  A fine-tuned run learns, then generates, evaluates (the figure training printed),
serves, resumes exactly, and loads with transformers alone; bad sources are one line."""

import json
import random

import pytest
import torch

import charrnn
from charrnn import checkpoint as ckpt

from .conftest import cli, make_text, running
from .hf_models import tiny_gpt2

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow       # every test here trains a model

FAST = dict(seq_len=64, batch_size=8, precision="fp32", sample_every=0, progress=False, log=lambda m: None)
OTHER_SENTENCES = ["she sells sea shells by the sea shore.", "peter piper picked a peck of pickled peppers.",
                   "how much wood would a woodchuck chuck?"]


def other_text(n_chars: int, seed: int = 0) -> str:
    """Text of sentences the base model never saw."""
    rng, parts = random.Random(seed), []
    while sum(map(len, parts)) < n_chars:
        parts.append(rng.choice(OTHER_SENTENCES) + ("\n" if rng.random() < 0.3 else " "))
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_finetune")
    corpus, other = tmp / "corpus.txt", tmp / "other.txt"
    corpus.write_text(make_text(40_000, seed=1), encoding="utf-8")
    other.write_text(other_text(30_000), encoding="utf-8")
    return {"tmp": tmp, "corpus": corpus, "other": other, "gpt": tiny_gpt2(tmp / "gpt", make_text(40_000))}


@pytest.fixture(scope="module")
def full(files):
    """The tiny GPT-2 fine-tuned whole for 80 steps."""
    run = files["tmp"] / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(files["tmp"] / "home"))
        charrnn.train(str(files["corpus"]), run, init_from=str(files["gpt"]), max_steps=80, eval_every=40, lr=3e-3,
                      **FAST)
    return run


def best_val(run) -> float:
    return min(m["val_loss"] for m in ckpt.read_metrics(run) if "val_loss" in m)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_a_full_fine_tune_learns_and_its_run_is_a_model_everywhere(files, full, capsys):
    from transformers import AutoModelForCausalLM

    before = charrnn.load(files["gpt"]).evaluate(str(files["corpus"]), val_fraction=0.1)
    lm = charrnn.load(full)
    after = lm.evaluate()
    assert after["bpc"] < before["bpc"] - 1.0, (before["bpc"], after["bpc"])
    assert after["loss"] == pytest.approx(best_val(full), rel=1e-6)     # eval says what validation said
    config = ckpt.read_config(full)
    assert config["init"]["from"] == str(files["gpt"].resolve()) and len(config["init"]["sha256"]) == 64
    # transformers alone loads the run's model folder, with the same predictions
    ids = lm.tokenizer("the quick brown fox")["input_ids"]
    alone = AutoModelForCausalLM.from_pretrained(full / ckpt.HF_FOLDER).eval()
    assert torch.equal(logits(alone, ids), logits(lm.model, ids))
    # generate (seeded), eval and serve take the run
    assert lm.generate("the ", 60, seed=3) == lm.generate("the ", 60, seed=3)
    code, out, _ = cli(capsys, "eval", full)
    assert code == 0 and f"{after['bpc']:.4f} bits/char" in out
    code, out, _ = cli(capsys, "generate", full, "--prompt", "the ", "--length", "40", "--temperature", "0")
    assert code == 0 and out.strip() == lm.generate("the ", 40, temperature=0)[0].strip()
    assert cli(capsys, "report", full, "--out", files["tmp"] / "report.html")[0] == 0
    assert str(files["gpt"].resolve()) in (files["tmp"] / "report.html").read_text()     # the lineage
    import httpx

    from charrnn.serve import create_app

    with running(create_app(lm)) as url:
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "the ", "length": 30, "seed": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["samples"] == lm.generate("the ", 30, seed=4)


def test_lora_trains_adapters_alone_and_peft_loads_them(files, full, tmp_path):
    from transformers import AutoModelForCausalLM

    base = full / ckpt.HF_FOLDER            # a model that knows the first corpus; adapted to other sentences
    before = charrnn.load(base).evaluate(str(files["other"]), val_fraction=0.1)["bpc"]
    run = tmp_path / "lora"
    charrnn.train(str(files["other"]), run, init_from=str(base), lora=4, max_steps=60, eval_every=30, lr=1e-2, **FAST)
    lm = charrnn.load(run)
    after = lm.evaluate()
    assert after["bpc"] < before - 0.3, (before, after["bpc"])
    assert after["loss"] == pytest.approx(best_val(run), rel=1e-4)      # merged for generation: float rounding
    folder = run / ckpt.HF_FOLDER
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve()) and adapter["r"] == 4
    assert not (folder / "model.safetensors").exists()                  # the adapter, not a copy of the model
    state = torch.load(run / ckpt.STATE, weights_only=True)
    assert state["model"] and all("lora_" in name for name in state["model"])
    # transformers (with peft installed) loads the adapter folder as it is, base included
    ids = lm.tokenizer("she sells sea shells")["input_ids"]
    alone = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(alone, ids), logits(lm.model, ids), atol=1e-4, rtol=1e-4)
    assert len(lm.generate("she ", 40, seed=1)[0]) > 4


@pytest.mark.parametrize("lora", [None, 2])
def test_resume_is_exact_and_a_hook_stops_the_run(files, tmp_path, lora):
    kw = dict(init_from=str(files["gpt"]), lora=lora, eval_every=10, lr=3e-3, **FAST)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    charrnn.train(str(files["corpus"]), straight, max_steps=24, **kw)
    result = charrnn.train(str(files["corpus"]), halves, max_steps=24,
                           hooks={"after_eval": lambda t, r: t.request_stop("enough") if r["step"] == 10 else None},
                           **kw)
    assert (result.stop_reason, result.step) == ("enough", 10)
    charrnn.train(str(files["corpus"]), halves, resume=True, max_steps=24, progress=False, log=lambda m: None)
    a, b = (ckpt.load_trainer_state(r) for r in (straight, halves))
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    losses = [[(m["step"], m.get("loss"), m.get("val_loss")) for m in ckpt.read_metrics(r)] for r in (straight, halves)]
    assert losses[0] == losses[1]


def test_bad_sources_and_options_are_one_line_and_write_nothing(files, tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    vit = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=16, image_size=8, patch_size=4)).save_pretrained(vit)
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    gpt = files["gpt"]
    cases = [
        (["--init-from", neither], "--init-from"),
        (["--init-from", vit], "--init-from"),
        (["--init-from", gpt, "--hidden", "64"], "--hidden"),
        (["--init-from", gpt, "--tokenizer", "bpe"], "--tokenizer"),
        (["--init-from", gpt, "--seq-len", "500"], "--seq-len"),
        (["--lora", "4"], "--lora"),
        (["--init-from", gpt, "--lora", "0"], "--lora"),
    ]
    for i, (args, names) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, _, err = cli(capsys, "train", files["corpus"], "--out", out, "--max-steps", "1", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and names in err, (args, err)
        assert not out.exists(), args


def test_resume_with_another_source_or_lora_is_refused(files, full, tmp_path, capsys):
    run = tmp_path / "run"
    charrnn.train(str(files["corpus"]), run, init_from=str(files["gpt"]), max_steps=4, **FAST)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ckpt.LOCK}
    for args, names in ((["--init-from", full / ckpt.HF_FOLDER], "--init-from"), (["--lora", "2"], "--lora")):
        code, _, err = cli(capsys, "train", files["corpus"], "--out", run, "--resume", "--max-steps", "8", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and names in err, (args, err)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ckpt.LOCK} == before
