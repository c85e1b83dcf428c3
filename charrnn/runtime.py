"""Generate text from an exported ``.onnx`` file with onnxruntime and NumPy alone (no torch).

>>> from charrnn import runtime
>>> lm = runtime.load("shk.onnx")                                              # doctest: +SKIP
>>> print(lm.generate("ROMEO:", 200, temperature=0.8, seed=1)[0])            # doctest: +SKIP

:class:`ExportedModel` has the same ``generate`` / ``stream`` / ``unknown_chars`` interface as
:class:`charrnn.api.LanguageModel`, with the same sampling semantics as :mod:`charrnn.sampling`:
temperature 0 is greedy, ``[UNK]`` is never produced, top-k, top-p then min-p filtering, all samples
of a call in one batched step, and a seed makes the text reproducible (:mod:`charrnn.portable_random`:
the same seed gives the same text here every time and in the exported web page, not the same text as the
PyTorch sampler).

The prompt is read one character at a time through the exported one-step graph (the PyTorch
sampler reads it with the fused recurrent kernel: same numbers within float rounding).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .cells import cell
from .errors import CharRNNError, OptionError
from .interfaces import Capabilities
from .labels import label_index
from .options import GREEDY_BELOW, SamplingParams, check_shape, start_text
from .portable_random import PortableRandom
from .tokens import TextStream, TokenVocab
from .vocab import UNK_ID, Vocab

FORMAT_VERSION = 1  # the export format this runtime reads (charrnn.export.FORMAT_VERSION)
# Sampling parameters the runtime does not decode (the PyTorch sampler does): refused unless left at their defaults.
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "stop", "logprobs")
_DEFAULT = SamplingParams()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, *, min_p: float | None = None) -> np.ndarray:
    """Scaled, filtered logits ``(batch, vocab)`` (float64; filtered-out entries are ``-inf``).

    :func:`charrnn.decoding.process_logits` in NumPy: ``[UNK]`` always removed, ``top_k`` keeps
    the k largest, ``top_p`` the smallest set of most likely characters whose mass reaches p,
    ``min_p`` those at least ``min_p`` times as likely as the most likely one.
    """
    logits = logits.astype(np.float64) / temperature
    logits[:, UNK_ID] = -np.inf
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, [-top_k]]
        logits[logits < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = _softmax(np.take_along_axis(logits, order, axis=-1))
        # Drop a character when the mass of the ones strictly more likely already reaches p.
        drop_sorted = (np.cumsum(probs, axis=-1) - probs) >= top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -np.inf
    if min_p:
        probs = _softmax(logits)
        logits[probs < min_p * probs.max(axis=-1, keepdims=True)] = -np.inf
    return logits


def choose(logits: np.ndarray, temperature: float, top_k, top_p, rng: PortableRandom, *,
           min_p: float | None = None) -> np.ndarray:
    """Next ids ``(batch,)`` int64 from logits ``(batch, vocab)``: greedy at temperature 0, else sampled."""
    if temperature < GREEDY_BELOW:
        masked = logits.astype(np.float32, copy=True)
        masked[:, UNK_ID] = -np.inf
        return masked.argmax(axis=-1)
    cdf = np.cumsum(_softmax(process_logits(logits, temperature, top_k, top_p, min_p=min_p)), axis=-1)
    u = rng.random((cdf.shape[0], 1)) * cdf[:, -1:]
    # searchsorted(cdf, u, right=True) row by row: the first id whose cumulative mass exceeds u.
    return np.minimum((cdf <= u).sum(axis=-1), cdf.shape[1] - 1).astype(np.int64)


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """:func:`charrnn.decoding.penalize` in NumPy: CTRL's repetition penalty on the ids ``seen``."""
    logits = logits.astype(np.float32)
    return np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits).astype(np.float32)


def session_options(threads: int | None = None):
    """onnxruntime options for the batch-1 loop: all graph optimisations, one op at a time,
    ``threads`` intra-op threads (default: onnxruntime's, one per physical core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # errors only
    return so


class ExportedModel:
    """An exported charrnn model loaded in onnxruntime, ready to generate: a
    :class:`charrnn.interfaces.TextGenerator` (sampling options alone: no stop texts or log-probabilities)."""

    capabilities = Capabilities(torch_free=True)

    def __init__(self, path, threads: int | None = None):
        path = Path(path)
        if not path.exists():
            raise CharRNNError(f"{path} does not exist; export a run with `charrnn export RUN --format onnx "
                               f"--out {path}`")
        if not path.is_file():
            raise CharRNNError(f"{path} is not a file; give an .onnx file written by `charrnn export`")
        try:
            import onnxruntime as ort
        except ImportError:
            raise CharRNNError("generating from an .onnx file needs onnxruntime; install the extra: "
                               "pip install -e \".[onnx]\"") from None
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CharRNNError(f"{path} cannot be loaded by onnxruntime ({first}); give an .onnx file written by "
                               "`charrnn export`") from None
        self.path = path
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        version = self.metadata.get("charrnn.format_version")
        if version is None:
            raise CharRNNError(f"{path} is an ONNX model but not a charrnn export (no charrnn metadata); export one "
                               "with `charrnn export RUN --format onnx --out FILE`")
        if version != str(FORMAT_VERSION):
            raise CharRNNError(f"{path} has export format version {version}, but this charrnn reads version "
                               f"{FORMAT_VERSION}; export the run again with this charrnn version")
        try:
            self.vocab = _vocab(json.loads(self.metadata["charrnn.vocab"]), self.metadata.get("charrnn.tokenizer"))
            self.config = json.loads(self.metadata["charrnn.model"])
            self.sampling_defaults = json.loads(self.metadata["charrnn.sampling"])
            self.arch, self.layers, self.hidden = self.config["arch"], self.config["layers"], self.config["hidden"]
            self.state_names = list(cell(self.arch).state)   # an unknown cell: CharRNNError
            self.labels, self.initial_state = self._labels(self.metadata.get("charrnn.labels"))
            self.sampling_params()          # the stored defaults are valid
        except (KeyError, TypeError, AttributeError, ValueError, RecursionError, CharRNNError) as e:
            raise CharRNNError(f"{path} has damaged charrnn metadata ({e}); export the run again") from None
        self.weights = self.metadata.get("charrnn.weights", "fp32")
        self.input_names = ["ids", *self.state_names]
        problem = self._graph_mismatch()
        if problem:
            raise CharRNNError(f"{path}: its charrnn metadata does not match its graph ({problem}); the file was "
                               "altered, export the run again")

    def _labels(self, meta: str | None) -> tuple[list[str], np.ndarray | None]:
        """A labelled export's label names and initial states (``(labels, states, layers, hidden)``, or None)."""
        n = self.config.get("n_labels", 0)
        if meta is None:
            if n:
                raise ValueError(f"the model reads {n} labels and the file names none")
            return [], None
        meta = json.loads(meta)
        names, packed = list(meta["names"]), meta["initial_state"]
        if len(names) != n or not all(isinstance(x, str) for x in names):
            raise ValueError(f"{len(names)} label names for a model of {n} labels")
        if packed is None:
            return names, None
        shape = (n, len(self.state_names), self.layers, self.hidden)
        return names, np.frombuffer(base64.b64decode(packed, validate=True), dtype=np.float32).reshape(shape)

    def label_index(self, label: str | None) -> int:
        """The label ``label`` names (None: unlabelled, 0); an OptionError for another label or a mix."""
        return label_index(label, self.labels)

    def _graph_mismatch(self) -> str | None:
        """What differs between the graph's inputs and outputs and the model the metadata describes."""
        state = [self.layers, "batch", self.hidden]
        want = {"ids": ["batch"], **{s: state for s in self.state_names}}
        got = {i.name: i.shape for i in self.session.get_inputs()}
        if list(got) != list(want):
            return f"inputs {', '.join(got)}, the metadata's {self.arch} reads {', '.join(want)}"
        for name in self.state_names:
            if [d if isinstance(d, int) else "batch" for d in got[name]] != state:
                return f"state {name} is {got[name]}, the metadata says {state}"
        logits = self.session.get_outputs()[0].shape
        if logits[-1] != len(self.vocab) or self.config.get("vocab_size") != len(self.vocab):
            return (f"the graph scores {logits[-1]} ids, the metadata's vocabulary has {len(self.vocab)} and its "
                    f"model {self.config.get('vocab_size')}")
        return None

    # -- the one-step model --------------------------------------------------------------
    def zero_state(self, batch: int, label: int = 0) -> list[np.ndarray]:
        """The state generation starts from: zeros, or ``label``'s learned initial state."""
        if self.initial_state is None:
            return [np.zeros((self.layers, batch, self.hidden), dtype=np.float32) for _ in self.state_names]
        return [np.repeat(self.initial_state[label, k][:, None, :], batch, axis=1) for k in range(len(self.state_names))]

    def step(self, ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``ids (batch,)`` and the state -> ``logits (batch, vocab)`` and the new state."""
        logits, *state = self.session.run(None, dict(zip(self.input_names, [ids, *state])))
        return logits, state

    def logits(self, text: str) -> np.ndarray:
        """The logits after every character of ``text`` (``(len(text), vocab)``), from the zero state."""
        state = self.zero_state(1)
        out = []
        for i in self.vocab.encode(text).astype(np.int64):
            logits, state = self.step(np.array([i], dtype=np.int64), state)
            out.append(logits[0])
        return np.stack(out) if out else np.zeros((0, len(self.vocab)), dtype=np.float32)

    def prime(self, prompts: Sequence[str], label: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """Read every prompt (each distinct prompt once, under ``label``); the last logits ``(batch, vocab)`` and
        the state."""
        by_prompt: dict[str, tuple] = {}
        offset = label * len(self.vocab)
        for p in prompts:
            if p not in by_prompt:
                state = self.zero_state(1, label)
                ids, tail = self.vocab.heal(start_text(p, self.vocab.chars))
                for i in ids:
                    logits, state = self.step(np.array([i + offset], dtype=np.int64), state)
                if tail:            # token healing: the first token completes the prompt's last one
                    logits = np.where(self.vocab.starting_with(tail), logits, -np.inf).astype(np.float32)
                by_prompt[p] = (logits, state)
        parts = [by_prompt[p] for p in prompts]
        state = [np.concatenate([s[k] for _, s in parts], axis=1) for k in range(len(self.state_names))]
        return np.concatenate([lg for lg, _ in parts], axis=0), state

    # -- the contract of charrnn.interfaces ----------------------------------------------
    @property
    def label(self) -> str:
        """``exported``, and the weights' precision."""
        return f"exported, {self.weights}"

    def describe(self) -> dict:
        """The file, its model and vocabulary (as a run's ``describe``)."""
        return {"file": self.path.name, "kind": "onnx", "model": self.config, "tokenizer": self.vocab.kind,
                "vocabulary": "".join(self.vocab.chars) if self.vocab.kind == "char" else len(self.vocab),
                "device": "cpu", "int8": self.weights == "int8", **({"labels": self.labels} if self.labels else {})}

    # -- generation (the interface of charrnn.api.LanguageModel) -------------------------
    def unknown_chars(self, text: str) -> list[str]:
        """Characters (or words) of ``text`` the model does not know (they are read as ``[UNK]``)."""
        return self.vocab.unknown(text)

    def sampling_params(self, params: SamplingParams | None = None, **options) -> SamplingParams:
        """The :class:`charrnn.options.SamplingParams` of a call, checked: ``params`` as given, or the defaults
        stored in the file (``temperature``, ``top_k``, ``top_p``: 1, none, none unless the file says otherwise)
        under the keyword ``options`` given; an option left ``None`` is not given.  Only what this runtime
        decodes: the OpenAI penalties, stop texts and log-probabilities are refused."""
        given = {k: v for k, v in options.items() if v is not None}
        if params is None:
            names = {f.name for f in dataclasses.fields(SamplingParams)}
            stored = {k: v for k, v in self.sampling_defaults.items() if k in names}
            params = SamplingParams(**{**stored, **given})
        else:
            params = SamplingParams.of(params, **given)
        for name in UNSUPPORTED:
            if getattr(params, name) != getattr(_DEFAULT, name):
                raise OptionError(name, "applies to run directories, not to an exported .onnx file; leave it out "
                                        "or generate from the run directory")
        return params

    def stream_ids(self, prompts: Sequence[str], length: int, params: SamplingParams | None = None,
                   **options) -> Iterator[np.ndarray]:
        """Yield the next ids ``(batch,)`` ``length`` times, one batched step each.

        ``params``, or keyword ``options``; those left ``None`` take the defaults stored in the file (see
        :meth:`sampling_params`).
        """
        params = self.sampling_params(params, **options)
        check_shape(length, len(prompts) or 1)
        rng = PortableRandom(params.seed)
        repetition_penalty = params.repetition_penalty
        label = self.label_index(params.label)
        if length == 0:
            return
        logits, state = self.prime(prompts, label)
        seen = None
        if repetition_penalty != 1:
            seen = np.zeros((len(prompts), len(self.vocab)), dtype=bool)
            for row, p in enumerate(prompts):
                seen[row, self.vocab.heal(start_text(p, self.vocab.chars))[0]] = True
        for i in range(length):
            if seen is not None:
                logits = penalize(logits, seen, repetition_penalty)
            logits[:, self.vocab.banned] = -np.inf      # as [UNK]: bytes a BPE model never saw in training
            ids = choose(logits, params.temperature, params.top_k, params.top_p, rng, min_p=params.min_p)
            if seen is not None:
                seen[np.arange(len(ids)), ids] = True
            yield ids
            if i + 1 < length:
                logits, state = self.step(ids + label * len(self.vocab), state)

    def stream(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
               params: SamplingParams | None = None, **options) -> Iterator[list[str]]:
        """Yield the new text of every sample, step by step, until each has ``length`` characters (the prompt is
        not repeated; a character model gives one character per step)."""
        prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
        text = TextStream(self.vocab.token_bytes, len(prompts), length,
                          [len(self.vocab.heal(start_text(p, self.vocab.chars))[1]) for p in prompts])
        steps = self.stream_ids(prompts, self.vocab.steps_for(length), self.sampling_params(params, **options))
        for ids in steps:
            yield text.push(ids.tolist())
            if text.done:
                steps.close()
                return

    def generate(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
                 params: SamplingParams | None = None, **options) -> list[str]:
        """``num_samples`` texts (prompt + ``length`` new characters), sampled in one batch.

        ``prompt`` may also be a list of prompts (one sample each).  ``temperature=0`` is greedy;
        ``params``, or keyword ``options`` (those left ``None`` take the file's defaults: :meth:`sampling_params`).
        """
        prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
        params = self.sampling_params(params, **options)
        check_shape(length, len(prompts))
        pieces: list[list[str]] = [[p] for p in prompts]
        for step in self.stream(prompts, length, params=params):
            for piece, ch in zip(pieces, step):
                piece.append(ch)
        return ["".join(p) for p in pieces]


def _vocab(meta: dict, tokenizer_json: str | None):
    """The exported vocabulary: characters, or a word / BPE tokenizer stored beside them in the file."""
    if isinstance(meta, dict) and meta.get("kind", "char") != "char":
        if tokenizer_json is None:
            raise CharRNNError(f"a {meta.get('kind')} vocabulary without its tokenizer")
        return TokenVocab.from_json(meta, tokenizer_json)
    return Vocab.from_json(meta)


def load(path, *, threads: int | None = None) -> ExportedModel:
    """Load an ``.onnx`` file written by ``charrnn export`` (``threads``: onnxruntime intra-op threads)."""
    return ExportedModel(path, threads=threads)
