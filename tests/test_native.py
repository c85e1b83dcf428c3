"""charrnn.native: where the C++ kernels are built, under which name, how a later process finds them,
and the pure-PyTorch fallback when they cannot be built.  (What they compute is tested against
PyTorch in test_sampling_fast.py and test_fast_rnn.py.)"""

import fnmatch
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from charrnn import native
from charrnn.errors import CharRNNError
from charrnn.models import CharLM, ModelConfig
from charrnn.stepper import Stepper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """native as in a new process on a machine that never built the kernels (an empty build folder)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_error", None)
    return native


@pytest.fixture
def no_compiler(monkeypatch):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", fail)


def _model():
    torch.manual_seed(1)
    return CharLM(ModelConfig(vocab_size=20, arch="gru", embed=8, hidden=24, layers=1)).eval()


def test_falls_back_to_python_when_the_build_fails(fresh, no_compiler):
    model = _model()
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        stepper = Stepper(model, "int8")
    assert stepper.backend == "python" and "command not found" in native.error()
    with pytest.raises(CharRNNError, match="command not found"):
        Stepper(model, backend="native")
    ids = torch.tensor([1, 2])
    logits, state = stepper.step(ids, stepper.from_module_state(model.zero_state(2)))
    assert logits.shape == (2, 20) and state[0].shape == (2, 24)


def test_warns_once_and_tries_once(fresh, no_compiler, monkeypatch):
    with pytest.warns(RuntimeWarning, match="command not found"):
        assert native.load() is None
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built twice in one process"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None and native.loaded() is None


def test_a_failed_build_is_explained_by_the_compilers_first_error():
    log = ("Error building extension 'charrnn_native_0': [1/8] c++ -MMD -c step.cpp -o step.o\n"
           "FAILED: step.o\nstep.cpp:137:20: error: expected primary-expression before 'arch'\n"
           "ninja: build stopped: subcommand failed.")
    assert native._reason(RuntimeError(log)) == ("RuntimeError: step.cpp:137:20: error: expected "
                                                 "primary-expression before 'arch'")
    assert "command not found" in native._reason(RuntimeError("Error building extension: c++: command not found"))


def test_builds_from_the_csrc_files_into_its_own_folder(fresh, monkeypatch):
    from torch.utils import cpp_extension

    calls = []

    def record(name, sources, **kwargs):
        calls.append((name, sources, kwargs))
        return "module"

    monkeypatch.setattr(cpp_extension, "load", record)
    assert native.load() == "module"
    ((name, sources, kwargs),) = calls
    assert name == native.build_name()
    assert sources == [p for p in native.sources() if p.endswith(".cpp")]
    assert {os.path.basename(p) for p in sources} >= {"bindings.cpp", "int8.cpp", "step.cpp", "dropout.cpp"}
    assert kwargs["build_directory"] == os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], name)
    assert {"-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"} <= set(kwargs["extra_cflags"])


def test_the_build_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert native.build_dir("x") == str(tmp_path / "ext" / "x")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert native.build_dir("x") == str(tmp_path / "cache" / "charrnn" / "x")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert native.build_dir("x") == str(tmp_path / "home" / ".cache" / "charrnn" / "x")


def test_the_build_name_hashes_every_source_file(monkeypatch, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(native.CSRC, csrc)
    monkeypatch.setattr(native, "CSRC", str(csrc))
    name = native.build_name()
    assert name == native.build_name() and name != native.build_name([])
    for path in native.sources():
        original = open(path, "rb").read()
        with open(path, "ab") as f:
            f.write(b"// changed\n")
        assert native.build_name() != name, path
        with open(path, "wb") as f:
            f.write(original)
    assert native.build_name() == name


def test_the_sources_ship_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["charrnn"]
    package = os.path.dirname(native.__file__)
    files = native.sources()
    assert files and all(os.path.isfile(p) for p in files)
    assert sorted(files) == sorted(os.path.join(native.CSRC, n) for n in os.listdir(native.CSRC)
                                   if n.endswith((".cpp", ".h")))
    for path in files:
        relative = os.path.relpath(path, package).replace(os.sep, "/")
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), (relative, patterns)


@pytest.mark.slow
def test_a_later_process_finds_the_build_without_cpp_extension(compiled):
    assert os.path.samefile(compiled.__file__, native._built_path(compiled.__name__))
    code = ("import sys; from charrnn import native; m = native.load(); "
            "print(m.__file__); print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout.split()
    assert os.path.samefile(out[0], compiled.__file__) and out[1] == "False"


def test_build_says_where_the_kernels_are(compiled, capsys):
    assert native.build() is compiled
    err = capsys.readouterr().err
    assert "already built" in err and compiled.__file__ in err and len(err.splitlines()) == 1
    assert native.main() == 0


def test_build_says_why_not(fresh, no_compiler, capsys):
    assert native.build() is None
    err = capsys.readouterr().err.splitlines()
    assert "compiling" in err[0] and "cannot build" in err[-1] and "command not found" in err[-1]
    assert native.main() == 1


@pytest.mark.slow
def test_python_m_charrnn_native(compiled):
    r = subprocess.run([sys.executable, "-m", "charrnn.native"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and "already built" in r.stderr and compiled.__file__ in r.stderr
