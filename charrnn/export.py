"""Export a run's one-step generator to ONNX: a file that :mod:`charrnn.runtime` (onnxruntime and
NumPy, no torch) generates from.

The graph is one step of :class:`charrnn.stepper.Stepper`, the cell the PyTorch sampler runs::

    inputs   ids    int64   (batch,)                  the current character of every sample
             h      float32 (layers, batch, hidden)   recurrent state
             c      float32 (layers, batch, hidden)   LSTM cell state (LSTM only; in general the cell's
                                                      state tensors, charrnn.cells.Cell.state)
    outputs  logits float32 (batch, vocab)            scores of the next character
             h_out, c_out                             the new state, shaped like h and c

``batch`` is a dynamic axis.  The first layer's input projection is folded into a
``(vocab, gates * hidden)`` table (embedding @ W_ih + b_ih), so a step is one row lookup, then
per layer one matrix product with the recurrent weights (and the input weights above the first
layer), the gate arithmetic (the cell's ``onnx()``, :mod:`charrnn.cells`), and the output layer.

The graph is written with ``onnx.helper`` from the weights rather than traced by ``torch.onnx``:
in torch 2.13 the TorchScript exporter warns that it will be removed, and the ``torch.export``
one is slow for this small graph (its ONNX function registry is rebuilt on every call) and
needs onnxscript; building the few nodes directly is quick, needs only the ``onnx`` package,
and tests/test_export.py checks the result against the PyTorch model (docs/design.md).

The vocabulary, model configuration, sampling defaults, the run's corpus options and the
versions are stored in the model's ``metadata_props`` (strings; JSON where structured), which
onnxruntime exposes as ``InferenceSession.get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, cells
from . import checkpoint as ckpt
from .errors import CharRNNError
from .fileio import atomic_write_bytes
from .models.charlm import CharLM
from .vocab import Vocab

FORMAT_VERSION = 1
OPSET = 17      # onnxruntime >= 1.13 runs it
IR_VERSION = 8  # the IR version of opset 17, so older onnxruntime releases load the file too
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": None}

# metadata_props keys (the runtime reads the same names)
META_FORMAT = "charrnn.format_version"
META_VERSION = "charrnn.version"
META_VOCAB = "charrnn.vocab"
META_TOKENIZER = "charrnn.tokenizer"     # a word or BPE vocabulary's tokenizer.json
META_MODEL = "charrnn.model"
META_SAMPLING = "charrnn.sampling"
META_WEIGHTS = "charrnn.weights"
META_SOURCE = "charrnn.source"
META_LABELS = "charrnn.labels"        # a labelled run's: {"names": [...], "initial_state": base64 float32 or null}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise CharRNNError("export needs the onnx package; install the extra: pip install -e \".[onnx]\"") from None
    return onnx


class _Graph:
    """A tiny builder over ``onnx.helper``: every op returns the name of its (single) output."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, value) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [f"{op_type.lower()}_{len(self.nodes)}_{k}" for k in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor, name: str) -> str:
        """``x @ W.T + b`` as MatMul + Add (the ops onnxruntime's dynamic int8 quantisation handles)."""
        w = self.const(f"{name}.weight_t", weight.detach().float().cpu().t().numpy())
        b = self.const(f"{name}.bias", bias.detach().float().cpu().numpy())
        return self.op("Add", self.op("MatMul", x, w), b)


def _layers(g: _Graph, model: CharLM) -> tuple[str, list[tuple[str, ...]]]:
    """The nodes of every layer: the last layer's output, and each layer's new state tensors."""
    c, rnn = model.config, model.rnn
    cell = cells.cell(c.arch)
    nodes = cell.impl_module().onnx
    with torch.no_grad():
        table = g.const("input_table", model.input_projection().float().cpu().contiguous().numpy())  # as Stepper's
    split = g.const("gate_split", np.full(cell.gates, c.hidden, dtype=np.int64))
    x = None
    new = []
    for i in range(c.layers):
        layer = g.const(f"layer_{i}", np.array(i, dtype=np.int64))
        gi = (g.op("Gather", table, "ids", axis=0) if i == 0
              else g.linear(x, getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"bias_ih_l{i}"), f"rnn.ih{i}"))
        state = tuple(g.op("Gather", s, layer, axis=0) for s in cell.state)  # (batch, hidden) each
        gh = (None if cell.input_only else
              g.linear(state[0], getattr(rnn, f"weight_hh_l{i}"), getattr(rnn, f"bias_hh_l{i}"), f"rnn.hh{i}"))
        new.append(nodes(cell, g, gi, gh, state, split))
        x = new[-1][0]
    return x, new


def step_graph(model: CharLM):
    """The ONNX model of one sampling step of ``model`` (no metadata yet)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    c = model.config
    g = _Graph(onnx)
    x, new = _layers(g, model)
    logits = g.linear(x, model.head.weight, model.head.bias, "head")
    axis0 = g.const("axis_0", np.array([0], dtype=np.int64))
    state_names = cells.cell(c.arch).state

    def stacked(parts: list[str], out: str) -> None:
        ups = [g.op("Unsqueeze", p, axis0) for p in parts]
        g.nodes.append(helper.make_node("Identity" if len(ups) == 1 else "Concat", ups, [out],
                                        **({} if len(ups) == 1 else {"axis": 0})))

    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    for k, s in enumerate(state_names):
        stacked([layer[k] for layer in new], f"{s}_out")

    state_shape = [c.layers, "batch", c.hidden]
    graph = helper.make_graph(
        g.nodes, f"charrnn_{c.arch}_step",
        inputs=[helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])]
        + [helper.make_tensor_value_info(s, TensorProto.FLOAT, state_shape) for s in state_names],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", c.vocab_size])]
        + [helper.make_tensor_value_info(f"{s}_out", TensorProto.FLOAT, state_shape) for s in state_names],
        initializer=g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charrnn",
                              producer_version=__version__,
                              doc_string="charrnn one-step generator: (ids, state) -> (logits, new state)")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def labels_metadata(model: CharLM, run_config: dict) -> dict | None:
    """A labelled run's label names and, when the label is read on the state, each label's initial state
    (float32 ``(labels, state tensors, layers, hidden)``, base64): what a runtime starts each label from.  The
    graph reads ids in label space (``label * vocab_size + id``)."""
    if not model.config.n_labels:
        return None
    initial = model.initial_state
    packed = (None if initial is None else
              base64.b64encode(initial.detach().float().cpu().contiguous().numpy().tobytes()).decode("ascii"))
    return {"names": run_config.get("labels", []), "initial_state": packed}


def metadata(model: CharLM, vocab: Vocab, run_config: dict, weights_file: str, weights: str) -> dict[str, str]:
    """What the runtime needs besides the graph (all values are strings)."""
    corpus = run_config.get("corpus", {})
    labels = labels_metadata(model, run_config)
    return {
        **({META_LABELS: json.dumps(labels)} if labels else {}),
        META_FORMAT: str(FORMAT_VERSION),
        META_VERSION: __version__,
        META_VOCAB: json.dumps(vocab.to_json(), ensure_ascii=False),
        META_MODEL: json.dumps(model.config.to_dict()),
        META_SAMPLING: json.dumps(SAMPLING_DEFAULTS),
        META_WEIGHTS: weights,
        META_SOURCE: json.dumps({"weights_file": weights_file, "corpus": corpus}, ensure_ascii=False),
        **({} if vocab.kind == "char" else {META_TOKENIZER: vocab.tokenizer.to_str()}),
    }


def quantize_int8(proto):
    """Dynamic int8 quantisation of the MatMul weights (per output column), via onnxruntime.

    ``reduce_range``: 7-bit weights.  On x86 CPUs without VNNI (AVX2 only) the u8 x s8 kernel
    adds pairs of products in saturating 16-bit arithmetic; with full-range weights a random
    GRU's logits were far off, with 7-bit weights close (docs/design.md)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise CharRNNError("--int8 needs onnxruntime; install the extra: pip install -e \".[onnx]\"") from None
    onnx = _onnx()
    with tempfile.TemporaryDirectory(prefix="charrnn-int8-") as tmp:
        src, out = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(proto, src)  # a path: older onnxruntime releases take no ModelProto here
        logging.disable(logging.WARNING)  # its advice to run shape pre-processing does not apply here
        try:
            quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(out)


def export_source(run) -> Path:
    """The run directory to export: ``run``, or the shipped model it names (base-en); refused when it is not one of
    charrnn's own recurrent models (a fine-tuned Hugging Face model)."""
    from . import shipped

    run = Path(shipped.resolve(str(run)))
    if ckpt.is_hf_run(run):
        raise CharRNNError(f"{run} fine-tunes a Hugging Face model; charrnn export writes charrnn's own recurrent "
                           f"models. Its hf/ folder is a transformers model: export that with transformers' tools "
                           f"(for example optimum's ONNX export)")
    return run


@dataclass
class ExportResult:
    path: Path
    bytes: int
    seconds: float
    weights_file: str
    weights: str  # fp32 or int8


def export_onnx(run, out, *, weights: str = "best", int8: bool = False, force: bool = False) -> ExportResult:
    """Write ``run``'s one-step generator (``weights``: best or latest) to the ONNX file ``out``.

    ``int8=True`` stores the matrix weights as int8 (onnxruntime dynamic quantisation).  An
    existing ``out`` is replaced only with ``force=True``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".onnx":
        raise CharRNNError(f"--out {out} must end in .onnx (that is how `charrnn generate` recognises an "
                           "exported model)")
    if out.is_dir():
        raise CharRNNError(f"--out {out} is a directory; give a file name ending in .onnx")
    if out.exists() and not force:
        raise CharRNNError(f"{out} already exists; use --force to replace it or choose another --out")
    if not out.parent.is_dir():
        raise CharRNNError(f"the folder of --out {out} does not exist; create it first")
    _onnx()
    run = export_source(run)
    loaded = ckpt.load_run(run, weights=weights, device="cpu")
    proto = step_graph(loaded.model)
    kind = "fp32"
    if int8:
        proto, kind = quantize_int8(proto), "int8"
    meta = metadata(loaded.model, loaded.vocab, loaded.config, loaded.weights, kind)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    return ExportResult(out, len(data), time.perf_counter() - t0, loaded.weights, kind)
