"""Each option written once: the dataclasses' fields, the flags built from them, the errors that name them,
runs written before the model's options were nested, `charrnn build` and docs/flags.md."""

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

import charrnn
from charrnn import cli as cli_module
from charrnn import native
from charrnn.config import FROM_CORPUS, ModelConfig, TrainConfig, build_config, option_fields, option_names
from charrnn.errors import CharRNNError, OptionError, flag
from charrnn.options import GenerationOptions, check_beam_width, check_sampling_options

from .conftest import TINY_KW, cli

FLAGS_DOC = Path(__file__).resolve().parents[1] / "docs" / "flags.md"

# The "training" section of a run's config.json as charrnn wrote it before the model's options were
# nested (arch, embed, hidden, ... beside the training options), for TINY_KW and 4 steps.
OLD_TRAINING = {
    "lowercase": False, "newlines_to_spaces": False, "arch": "gru", "embed": 16, "hidden": 48, "layers": 1,
    "dropout": 0.0, "weight_drop": 0.0, "seq_len": 32, "batch_size": 16, "window_step": None, "stateful": False,
    "loss_on": "all", "lr": 0.001, "optimizer": "adam", "weight_decay": 0.0, "clip": 5.0,
    "lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1, "epochs": None, "max_steps": 4,
    "time_limit": None, "val_fraction": 0.1, "eval_every": None, "eval_streams": 16, "log_every": 10,
    "checkpoint_every": None, "sample_every": None, "sample_temperatures": [0.2, 0.5, 1.0, 1.2],
    "sample_length": 200, "sample_prompt": None, "seed": 0, "device": "auto", "precision": "fp32",
}


# --------------------------------------------------------------------------- the model's options, nested


def test_model_options_are_nested_and_given_by_their_own_names():
    cfg = build_config("keras-lstm", hidden=64)
    assert cfg.model == ModelConfig(arch="lstm", embed=0, hidden=64, layers=1)
    assert cfg.model_config(30) == ModelConfig(30, "lstm", 0, 64, 1)
    assert build_config(model=ModelConfig(hidden=32), layers=2).model == ModelConfig(hidden=32, layers=2)
    assert build_config(model={"hidden": 32}).model.hidden == 32
    d = cfg.to_dict()
    assert d["model"] == {"arch": "lstm", "embed": 0, "hidden": 64, "layers": 1, "dropout": 0.0, "weight_drop": 0.0,
                          "label_on": "input"}
    assert "hidden" not in d and TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(CharRNNError, match="unknown training option.*hiden"):
        build_config(hiden=3)


def test_an_old_flat_training_section_still_loads():
    cfg = TrainConfig.from_dict(OLD_TRAINING)
    assert cfg == build_config(max_steps=4, **TINY_KW)
    assert cfg.model == ModelConfig(arch="gru", embed=16, hidden=48, layers=1)


def test_runs_written_before_the_nesting_load_and_resume(small_corpus, tmp_path):
    run = tmp_path / "run"
    charrnn.train(str(small_corpus), run, progress=False, max_steps=4, **TINY_KW)
    path = run / "config.json"
    config = json.loads(path.read_text())
    assert config["training"]["model"]["hidden"] == 48  # written nested now
    config["training"] = OLD_TRAINING
    path.write_text(json.dumps(config))
    lm = charrnn.load(run)
    assert len(lm.generate("the ", 5, seed=1)[0]) == 9
    assert charrnn.train(str(small_corpus), run, resume=True, max_steps=6, progress=False).step == 6
    rewritten = json.loads(path.read_text())["training"]
    assert rewritten["model"]["hidden"] == 48 and rewritten["max_steps"] == 6 and "hidden" not in rewritten


# --------------------------------------------------------------------------- flags from the fields


def test_every_option_field_is_a_flag_of_train_and_generate():
    parser = cli_module.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    nested = {f.name for f in dataclasses.fields(ModelConfig)} - set(FROM_CORPUS)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"} | nested
    assert set(option_names(TrainConfig)) == train_fields
    for command, cls in (("train", TrainConfig), ("generate", GenerationOptions)):
        actions = {a.dest: a for a in subs[command]._actions}
        for owner, f, _ in option_fields(cls):
            action = actions[f.name]
            assert action.option_strings == [flag(f.name)]
            assert action.help.startswith(f.metadata["help"])
            assert action.choices == f.metadata.get("choices")
            if f.metadata.get("default_text") is None and f.default not in (None, False, dataclasses.MISSING):
                assert f"(default {f.default:g})" in action.help if isinstance(f.default, float) else \
                    f"(default {f.default})" in action.help


def test_train_flags_left_out_take_the_dataclass_defaults():
    args = cli_module.build_parser().parse_args(["train", "corpus.txt", "--out", "run", "--hidden", "32"])
    options = {name: getattr(args, name) for name in option_names(TrainConfig)}
    assert options.pop("hidden") == 32 and set(options.values()) == {None}
    assert build_config(**options, hidden=32) == TrainConfig(model=ModelConfig(hidden=32))


def test_bad_sample_temperatures_is_one_usage_line(capsys):
    code, _, err = cli(capsys, "train", "x", "--out", "y", "--sample-temperatures", "0.5,hot")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "numbers separated by commas" in err


# --------------------------------------------------------------------------- errors name the option


def test_option_errors_name_the_field_or_the_flag():
    with pytest.raises(OptionError) as e:
        check_sampling_options(top_p=2)
    assert e.value.option == "top_p"
    assert str(e.value) == "top_p must be in (0, 1], got 2"
    assert e.value.render(flag) == "--top-p must be in (0, 1], got 2"
    with pytest.raises(OptionError) as e:
        build_config(stateful=True, loss_on="last")
    assert e.value.render(flag) == ("--stateful reads contiguous streams: it cannot be combined with --window-step "
                                    "or --loss-on last; drop one of them")
    assert str(e.value).startswith("stateful reads") and "--" not in str(e.value)
    with pytest.raises(OptionError, match="^beam_width must be a positive integer, got 0$"):
        check_beam_width(0)
    with pytest.raises(OptionError, match="^vocab_size must be given"):
        ModelConfig().validate()
    copy = pickle.loads(pickle.dumps(e.value))
    assert type(copy) is OptionError and str(copy) == str(e.value) and copy.render(flag) == e.value.render(flag)


@pytest.mark.parametrize("args,expected", [
    (["--hidden", "0"], "--hidden must be a positive integer, got 0"),
    (["--clip", "-1"], "--clip must be >= 0 (0 turns clipping off), got -1.0"),
    (["--stateful", "--window-step", "3"], "--stateful reads contiguous streams"),
    (["--sample-temperatures", "0.5,-1"], "--sample-temperatures must be numbers >= 0"),
])
def test_the_command_line_names_the_flag(capsys, small_corpus, tmp_path, args, expected):
    code, _, err = cli(capsys, "train", small_corpus, "--out", tmp_path / "run", "--max-steps", "1", *args)
    assert code == 2 and err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1


def test_generation_options_check_like_before():
    check_sampling_options(0.0, None, 1.0, 0, 1)
    check_sampling_options(0.7, 5, 0.9, 10, 3)
    for kwargs, option in ((dict(temperature=-1), "temperature"), (dict(temperature=None), "temperature"),
                           (dict(top_k=0), "top_k"), (dict(top_p=0), "top_p"), (dict(length=-1), "length"),
                           (dict(length=None), "length"), (dict(num_samples=0), "num_samples")):
        with pytest.raises(OptionError) as e:
            check_sampling_options(**kwargs)
        assert e.value.option == option


# --------------------------------------------------------------------------- charrnn build


def test_build_command_builds_with_progress_and_fails_in_one_line(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(native, "build", lambda verbose=False: calls.append(verbose) or native, raising=False)
    assert cli(capsys, "build")[0] == 0 and len(calls) == 1
    monkeypatch.setattr(native, "build", lambda verbose=False: None, raising=False)
    code, _, err = cli(capsys, "build")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pure-PyTorch" in err


@pytest.mark.slow
def test_build_command_compiles_the_kernels(capsys):
    code, _, err = cli(capsys, "build")
    assert code == 0, err
    assert native.loaded() is not None


# --------------------------------------------------------------------------- docs/flags.md


def test_flags_reference_is_up_to_date():
    assert FLAGS_DOC.read_text(encoding="utf-8") == cli_module.flags_markdown(), (
        f"docs/flags.md is out of date; regenerate it with: {cli_module.REGENERATE_FLAGS}")
