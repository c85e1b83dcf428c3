"""A hostile user's `min_p`, on every surface the sampling-parameters object reaches: the library, `charrnn generate`
(a run and an .onnx file), the torch-free runtime, `/v1/generate` and `/v1/completions`.  NaN, infinities, negative,
past 1, a string, a boolean, a list and huge numbers are refused naming the option (never a traceback, a 500 or a
sample drawn from NaN); 0 and 1, its ends, are honoured."""

import json

import httpx
import pytest

import charrnn
from charrnn import runtime
from charrnn.errors import OptionError
from charrnn.export import export_onnx
from charrnn.options import SamplingParams
from charrnn.serve import create_app

from ..conftest import cli, running, train_tiny_run
from .test_corpora import one_line_error

# Sent as JSON (NaN and the infinities as JSON's NaN / Infinity, which strict parsers refuse as well).
HOSTILE = [float("nan"), float("inf"), float("-inf"), -1e-9, -1, 1.0000001, 2, 1e308, 10**30, -10**30, 2**63,
           "0.1", "", True, False, [], [0.1], {}]
FLAGS = ["nan", "inf", "-inf", "-0.1", "-1", "1.0000001", "2", "1e308", "99999999999999999999999"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "hostile_min_p", max_steps=2)


@pytest.fixture(scope="module")
def onnx_file(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_min_p_onnx") / "m.onnx"
    export_onnx(run_dir, path)
    return path


@pytest.mark.probe("min-p-hostile")
def test_hostile_min_p_values_are_refused_by_the_library_and_the_runtime(run_dir, onnx_file):
    lm, exported = charrnn.load(run_dir), runtime.load(onnx_file)
    for value in HOSTILE:
        if value is False:          # a boolean is not a number, whichever it is
            value = True
        for make in (lambda v: SamplingParams(min_p=v), lambda v: lm.generate("a", 3, min_p=v),
                     lambda v: exported.generate("a", 3, min_p=v), lambda v: list(lm.stream("a", 3, min_p=v))):
            with pytest.raises(OptionError) as e:
                make(value)
            assert e.value.option == "min_p" and str(e.value).startswith("min_p must be in [0, 1]"), value
    for edge in (0, 0.0, 1, 1.0, 5e-324):
        assert len(lm.generate("a", 3, min_p=edge, seed=1)[0]) == 4
        assert len(exported.generate("a", 3, min_p=edge, seed=1)[0]) == 4


@pytest.mark.probe("min-p-hostile")
def test_hostile_min_p_flags_are_one_line_naming_the_flag(capsys, run_dir, onnx_file):
    for model in (run_dir, onnx_file):
        for value in FLAGS:
            code, out, err = cli(capsys, "generate", model, "--length", 5, f"--min-p={value}")
            one_line_error(code, err, "--min-p must be in [0, 1]")
            assert out == ""
        code, out, err = cli(capsys, "generate", model, "--length", 5, "--min-p", "lots")
        assert code == 2 and "--min-p" in err and "Traceback" not in err and out == ""
        code, out, err = cli(capsys, "generate", model, "--length", 5, "--min-p", "1", "--seed", "1")
        assert code == 0 and len(out) == 5 + 1, err


@pytest.mark.probe("min-p-hostile")
def test_hostile_min_p_fields_are_refused_by_both_endpoints_naming_the_field(run_dir):
    lm = charrnn.load(run_dir)
    with running(create_app(lm)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for value in HOSTILE:
            for endpoint, body in (("/v1/generate", {"prompt": "a", "length": 3}),
                                   ("/v1/completions", {"prompt": "a", "max_tokens": 3})):
                r = client.post(endpoint, content=json.dumps({**body, "min_p": value}).encode(),
                                headers={"Content-Type": "application/json"})
                case = (endpoint, value, r.status_code, r.text[:300])
                assert r.headers["content-type"] == "application/json", case
                error = r.json()["error"]
                if endpoint == "/v1/completions":
                    assert r.status_code == 400 and error["param"] == "min_p", case
                    assert error["type"] == "invalid_request_error" and "--" not in error["message"], case
                else:
                    assert r.status_code == 422 and "min_p" in error and "--" not in error, case
        for value in (0, 1, 0.5, None):             # null: the default (off)
            for endpoint, body in (("/v1/generate", {"prompt": "a", "length": 3}),
                                   ("/v1/completions", {"prompt": "a", "max_tokens": 3})):
                r = client.post(endpoint, json={**body, "min_p": value, "seed": 1})
                assert r.status_code == 200, (endpoint, value, r.text)
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["failed"] == 0 and health["running"] == 0
