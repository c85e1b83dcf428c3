"""``charrnn export RUN --format web --out DIR``: a folder that generates in a web page, with no server and no
Python, opened from disk (file://) or from any static host.

The folder holds the page (``index.html``, ``style.css``, ``page.js``), the library a user's own page can
load (``charrnn.js``), the third-party JavaScript (``vendor/``: onnxruntime-web and tokenizers.js, built by
tools/build_web_vendor.py) and the model (``model.js``).  Every file is a classic script or a stylesheet:
a page opened from disk may load those, but may neither ``fetch()`` files nor import ES modules.

``model.js`` sets ``charrnnFiles.model`` to the JSON of :func:`model_json`: the one-step ONNX graph of
:mod:`charrnn.export` (gzip, base64), the vocabulary (its characters, or the tokenizer.json a word or BPE
run encodes prompts with and each id's bytes), the model's shape and the sampling defaults.

The weights are int8 where that costs at most :data:`INT8_TOLERANCE` bits/char on the run's validation
split, measured through both graphs with onnxruntime here; fp32 otherwise, or when the split cannot be read.
The page's int8 is weight-only (:func:`weight_only_int8`): int8 in the file, restored to fp32 by onnxruntime
when the page loads it, because onnxruntime-web's int8 kernels are slower than its fp32 ones
(docs/web.md has the figures); `--int8` for an .onnx file is dynamic quantisation, which computes in int8.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from . import __version__, cells
from . import checkpoint as ckpt
from .errors import CharRNNError
from .export import SAMPLING_DEFAULTS, export_source, labels_metadata, step_graph
from .fileio import replace_folder

FORMAT_VERSION = 1           # of model.js (charrnn/web/charrnn.js reads the same)
INT8_TOLERANCE = 0.001       # bits/char int8 weights may lose against fp32 and still be the default
EVAL_TARGETS = 1 << 16       # validation ids the int8 check reads at most (in EVAL_STREAMS streams)
EVAL_STREAMS = 32
PAGE_FILES = ("index.html", "style.css", "page.js", "charrnn.js")
VENDOR_FILES = ("charrnn-vendor.js", "ort-wasm.js", "LICENSES.txt")
MODEL_FILE = "model.js"
PRECISIONS = ("auto", "int8", "fp32")
# The session option (onnxruntime's, charrnn.js gives it too) that folds weight_only_int8's DequantizeLinear
# nodes into fp32 weights instead of running the matrix products in int8.
FOLD_WEIGHTS = ("session.disable_quant_qdq", "1")


@dataclass
class WebExportResult:
    path: Path
    bytes: int               # the whole folder
    seconds: float
    weights_file: str
    weights: str             # fp32 or int8
    bits_per_char: dict      # {"fp32": x, "int8": y} on the validation split, or {} when not measured
    note: str                # why the weights are what they are


def weight_only_int8(proto):
    """``proto`` with every weight matrix (each MatMul's and Gather's initializer) stored as int8, one symmetric
    scale per output (MatMul: per column; Gather: per row), behind a DequantizeLinear node.  onnxruntime folds
    those nodes into fp32 weights when the session is made with :data:`FOLD_WEIGHTS`."""
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in proto.graph.initializer}
    axis_of = {"MatMul": 1, "Gather": 0}
    nodes = []
    for node in proto.graph.node:
        name = node.input[0] if node.op_type == "Gather" else node.input[1] if node.op_type == "MatMul" else None
        if name in weights and len(weights[name].dims) == 2:
            axis = axis_of[node.op_type]
            w = numpy_helper.to_array(weights.pop(name))
            scale = np.abs(w).max(axis=1 - axis) / 127
            scale[scale == 0] = 1
            q = np.rint(w / np.expand_dims(scale, 1 - axis)).astype(np.int8)
            proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name == name))
            proto.graph.initializer.extend([numpy_helper.from_array(q, f"{name}.int8"),
                                            numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale")])
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale"], [name], axis=axis))
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def _bits_per_char(graph: bytes, ids: np.ndarray, token_chars: np.ndarray, state_names) -> float:
    """Bits per character of the one-step ``graph`` over ``ids`` (read in EVAL_STREAMS streams from the zero
    state): the predicted ids' log-loss over the characters they spell (``token_chars`` per id)."""
    import onnxruntime as ort

    from .runtime import session_options

    options = session_options()
    options.add_session_config_entry(*FOLD_WEIGHTS)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    usable = min(len(ids) - 1, EVAL_TARGETS) // EVAL_STREAMS * EVAL_STREAMS
    x = ids[:usable].reshape(EVAL_STREAMS, -1).astype(np.int64)
    y = ids[1:usable + 1].reshape(EVAL_STREAMS, -1).astype(np.int64)
    state_shape = session.get_inputs()[1].shape
    state = [np.zeros((state_shape[0], EVAL_STREAMS, state_shape[2]), dtype=np.float32) for _ in state_names]
    nats = 0.0
    for t in range(x.shape[1]):
        logits, *state = session.run(None, {"ids": x[:, t], **dict(zip(state_names, state))})
        z = logits.astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nats -= logp[np.arange(EVAL_STREAMS), y[:, t]].sum()
    return nats / math.log(2) / max(int(token_chars[y].sum()), 1)


def choose_weights(loaded, precision: str) -> tuple[str, bytes, dict, str]:
    """The weights the page gets (``precision``: auto, int8 or fp32): (kind, serialized graph, bits/char by
    kind, why)."""
    proto = step_graph(loaded.model)
    fp32 = proto.SerializeToString()
    if precision == "fp32":
        return "fp32", fp32, {}, "fp32 as asked (--fp32)"
    int8 = weight_only_int8(copy.deepcopy(proto)).SerializeToString()
    if precision == "int8":
        return "int8", int8, {}, "int8 as asked (--int8)"
    from .evaluation import held_out_ids

    try:
        ids, _ = held_out_ids(loaded.config, loaded.vocab)
    except CharRNNError:
        return "fp32", fp32, {}, ("fp32: the run's validation split, on which int8 is checked, cannot be read here "
                                  "(--int8 stores int8 unchecked)")
    if len(ids) <= EVAL_STREAMS:
        return "fp32", fp32, {}, "fp32: the validation split is too short to compare int8 against"
    token_chars = np.array([len(b.decode("utf-8", errors="replace")) for b in loaded.vocab.token_bytes])
    names = cells.cell(loaded.model.config.arch).state
    bpc = {kind: round(_bits_per_char(graph, ids, token_chars, names), 5)
           for kind, graph in (("fp32", fp32), ("int8", int8))}
    if bpc["int8"] - bpc["fp32"] <= INT8_TOLERANCE:
        return "int8", int8, bpc, f"int8: {bpc['int8']} bits/char on validation against fp32's {bpc['fp32']}"
    return "fp32", fp32, bpc, (f"fp32: int8 would cost {bpc['int8'] - bpc['fp32']:.4f} bits/char on validation "
                               f"({bpc['int8']} against {bpc['fp32']}), more than {INT8_TOLERANCE}")


def model_json(loaded, graph: bytes, weights: str, bits_per_char: dict) -> dict:
    """What charrnn.js reads from model.js."""
    vocab = loaded.vocab
    if vocab.kind == "char":
        vocab_meta = {"kind": "char", "chars": "".join(vocab.chars)}
    else:
        vocab_meta = {"kind": vocab.kind, "tokenizer": json.loads(vocab.tokenizer.to_str()),
                      "token_bytes": [base64.b64encode(b).decode("ascii") for b in vocab.token_bytes],
                      "banned": list(vocab.banned)}
    return {
        "format": FORMAT_VERSION, "charrnn": __version__, "labels": labels_metadata(loaded.model, loaded.config),
        "model": loaded.model.config.to_dict(), "state": list(cells.cell(loaded.model.config.arch).state),
        "vocab": vocab_meta, "sampling": SAMPLING_DEFAULTS, "weights": weights, "bits_per_char": bits_per_char,
        "source": {"weights_file": loaded.weights, "corpus": loaded.config.get("corpus", {}).get("name")},
        "onnx": base64.b64encode(gzip.compress(graph, 9, mtime=0)).decode("ascii"),
    }


def _check_out(out: Path, run: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a file, holds the run, or holds anything but an exported page (unless
    ``force`` and it is one)."""
    if out.exists() and not out.is_dir():
        raise CharRNNError(f"--out {out} is a file; give a folder (it is created) for --format web")
    if not out.parent.is_dir():
        raise CharRNNError(f"the folder above --out {out} does not exist; create it first")
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise CharRNNError(f"--out {out} is inside the run {run}; give a folder of its own")
    if out.is_dir() and any(out.iterdir()):
        is_page = (out / MODEL_FILE).is_file() and (out / "index.html").is_file()
        if not is_page:
            raise CharRNNError(f"--out {out} is a folder that holds other files; give a new or empty folder")
        if not force:
            raise CharRNNError(f"--out {out} already holds an exported page; use --force to replace it or choose "
                               "another --out")


def _write_folder(folder: Path, model: dict) -> None:
    web = resources.files("charrnn") / "web"
    for name in PAGE_FILES:
        (folder / name).write_bytes((web / name).read_bytes())
    (folder / "vendor").mkdir()
    for name in VENDOR_FILES:
        (folder / "vendor" / name).write_bytes((web / "vendor" / name).read_bytes())
    (folder / MODEL_FILE).write_text(
        f"// A charrnn model for charrnn.js, written by charrnn export --format web {__version__}\n"
        f"(globalThis.charrnnFiles = globalThis.charrnnFiles || {{}}).model = {json.dumps(model)};\n",
        encoding="ascii")


def export_web(run, out, *, weights: str = "best", precision: str = "auto", force: bool = False) -> WebExportResult:
    """Write ``run``'s page into the folder ``out`` (created; an exported page there is replaced only with
    ``force``).  ``precision``: auto (int8 where it costs at most INT8_TOLERANCE bits/char), int8 or fp32."""
    t0 = time.perf_counter()
    out = Path(out)
    if precision not in PRECISIONS:
        raise CharRNNError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    run = export_source(run)
    _check_out(out, run, force)
    loaded = ckpt.load_run(run, weights=weights, device="cpu")
    kind, graph, bpc, note = choose_weights(loaded, precision)
    model = model_json(loaded, graph, kind, bpc)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    replace_folder(out, lambda folder: _write_folder(folder, model))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return WebExportResult(out, size, time.perf_counter() - t0, loaded.weights, kind, bpc, note)
