"""The Python interface: train, load a run, generate, evaluate.

>>> import charrnn
>>> result = charrnn.train("shakespeare", "runs/shk", max_steps=200)     # doctest: +SKIP
>>> lm = charrnn.load("runs/shk")                                         # doctest: +SKIP
>>> print(lm.generate("ROMEO:", length=200, temperature=0.8, seed=1)[0])  # doctest: +SKIP
>>> lm.evaluate()                                                         # doctest: +SKIP
{'loss': 1.52, 'bpc': 2.19, 'perplexity': 4.57, 'chars': 111539}
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed, shipped, sources
from .config import build_config
from .corpus import load_corpus
from .dynamic import Adapter, dynamic_evaluate, gradient_rms
from .errors import CharRNNError, OptionError
from .evaluation import (
    evaluate,
    evaluate_labels,
    held_out_ids,
    label_parts,
    recorded_split,
    training_ids,
)
from .generator import Generator
from .hardware import resolve_device
from .interfaces import Capabilities
from .labels import label_index, load_labelled
from .options import DynamicOptions
from .sampling import Sampler
from .tokenized import unknown
from .vocab import UNK_ID

if TYPE_CHECKING:  # the training code is imported by train() alone: loading a run for inference needs none of it
    from .training import TrainResult


def train(corpus: str, out: str | Path, *, preset: str | None = None, resume: bool = False, force: bool = False,
          progress: bool = True, log=None, hooks: Mapping[str, Callable] | None = None, **options) -> TrainResult:
    """Train a model on ``corpus`` (a text file, a folder of ``.txt`` files, or a corpus name) into ``out``.

    ``options`` are the fields of :class:`charrnn.config.TrainConfig` (``arch``, ``hidden``,
    ``seq_len``, ``lr``, ``max_steps``, ``time_limit``, ...), layered over ``preset``.  With
    ``resume=True`` the run continues from its last checkpoint with its saved options; options
    given here override the saved ones (to extend ``max_steps``, say).  ``progress`` shows a
    progress bar; ``log(message)`` receives the summary and evaluation lines (default: stderr).
    ``hooks`` maps events to functions ``fn(trainer, info)`` (see :mod:`charrnn.training`), e.g.
    ``{"after_eval": fn}`` to see every validation loss, and stop with ``trainer.request_stop()``.

    Started by ``torchrun`` with several processes, every process calls this with the same
    arguments and they train one model data-parallel (see :mod:`charrnn.distributed`); only
    rank 0 reads and writes ``out`` and prints.
    """
    out = Path(out)
    if isinstance(options.get("init_from"), os.PathLike):
        options = {**options, "init_from": os.fspath(options["init_from"])}
    with ExitStack() as held, distributed.session() as d:
        held.enter_context(ckpt.out_of_space_advice(out, corpus))   # outermost: it sees every write's failure
        loaded = []

        def prepare():
            # Rank 0 alone reads the saved options and prepares the run directory; the others get
            # the resulting configuration, so they never touch (or need) the run directory.
            held.enter_context(ckpt.writer_lock(out, create=not resume))   # one trainer per run directory, until training ends
            if resume:
                saved = ckpt.read_config(out)
                values = dict(saved.get("training", {}))
                sources.check_resume(values.get("init_from"), options.get("init_from"), out)
                values.update({k: v for k, v in options.items() if v is not None})
                cfg = build_config(None, **values)
            else:
                cfg = build_config(preset, **options)
                if cfg.init_from is not None:       # the source's architecture and tokenizer
                    sources.check_not_replaced(shipped.resolve(cfg.init_from), out)
                    cfg = build_config(preset, **_source_options(options, cfg.init_from))
            d.check_batch(cfg.batch_size)
            loaded.append(_corpus(cfg)(corpus, lowercase=cfg.lowercase, newlines_to_spaces=cfg.newlines_to_spaces,
                                       progress=progress))
            if not resume:
                ckpt.check_new_run_dir(out, force=force)   # the Trainer replaces a forced run when all is checked
            return cfg

        cfg = d.on_rank0(prepare)
        # The other ranks load the corpus after rank 0 has encoded it: on its machine they find it cached.
        data = loaded[0] if loaded else _corpus(cfg)(corpus, lowercase=cfg.lowercase,
                                                     newlines_to_spaces=cfg.newlines_to_spaces, progress=False)
        trainer = _trainer_class(cfg)(data, cfg, out, resume=resume, progress=progress and d.main,
                          log=log if d.main else (lambda msg: None), dist=d)
        for event, fn in (hooks or {}).items():
            trainer.add_hook(event, fn)
        return trainer.fit()


def _corpus(cfg):
    """What reads the corpus: a labelled corpus's reader (charrnn.labels) with --labels, else load_corpus."""
    return load_labelled if cfg.labels else load_corpus


def is_pretrained_source(source: str) -> bool:
    """Whether ``--init-from`` ``source`` is a Hugging Face model (not a charrnn run or shipped model)."""
    from . import hf

    return hf.is_pretrained(shipped.resolve(source))


def _source_options(options: dict, source: str) -> dict:
    """The options of a run that starts from ``source``, with its architecture (a charrnn run's) or checked to
    leave the architecture to it (a Hugging Face model's)."""
    if is_pretrained_source(source):
        from .hf_training import options as pretrained_options

        return pretrained_options(options, source)
    if options.get("lora") is not None:
        raise OptionError("lora", "trains adapters on a Hugging Face model, but {init_from} {source} is a charrnn "
                                  "run; drop {lora}", source=source)
    return sources.options(options, sources.config(source), source)


def _trainer_class(cfg):
    """The trainer of the run's kind of model: charrnn's own (on a labelled corpus or not), or a Hugging Face model
    it starts from."""
    if cfg.labels:
        from .labelled_training import LabelledTrainer

        return LabelledTrainer
    if cfg.init_from is not None and is_pretrained_source(cfg.init_from):
        from .hf_training import HFTrainer

        return HFTrainer
    from .training import Trainer

    return Trainer


class LanguageModel(Generator):
    """A trained run, loaded for generation and evaluation."""

    capabilities = Capabilities(complete=True, beam_search=True, evaluate=True, dynamic=True, serve=True,
                                batchable=True, prompt_cache=True, int8=True, weights=True)

    def __init__(self, loaded: ckpt.LoadedRun, device: torch.device, int8: bool = False):
        self.run = loaded
        self.model = loaded.model
        self.vocab = loaded.vocab
        self.config = loaded.config
        self.device = device
        self.int8 = int8
        if int8 and device.type != "cpu":
            raise OptionError("int8", "{int8} sampling runs on the CPU only, not on {kind}; drop {int8} or use "
                                      "{device} cpu", kind=device.type)
        self.labels = loaded.config.get("labels") or []     # a labelled run's label names (charrnn.labels)
        self.sampler = Sampler(self.model, self.vocab, weights="int8" if int8 else "fp32", labels=self.labels)
        self.capabilities = dataclasses.replace(self.capabilities, batchable=self.sampler.batchable)

    @property
    def label(self) -> str:
        """The weights file loaded (the best weights' or the latest checkpoint's)."""
        return self.run.weights

    def describe(self) -> dict:
        """What the server's ``/v1/model`` says about the run."""
        corpus = self.config.get("corpus", {})
        return {
            "run": self.run.path.name,
            "weights": self.run.weights,
            "model": self.config.get("model", {}),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "corpus": {"name": Path(corpus["name"]).name if corpus.get("name") else None,
                       "chars": corpus.get("chars")},
            "tokenizer": self.vocab.kind,
            "vocabulary": "".join(self.vocab.chars) if self.vocab.kind == "char" else len(self.vocab),
            "device": str(self.device),
            "int8": bool(self.int8),
        }

    def evaluate(self, corpus: str | None = None, *, val_fraction: float | None = None, seq_len: int = 256,
                 n_streams: int = 16, dynamic: DynamicOptions | None = None, label: str | None = None) -> dict:
        """Loss on the run's validation split, or on all of ``corpus`` (its last ``val_fraction`` when given):
        ``{loss, perplexity}`` per token, ``{bpc, nats_per_char}`` per character (comparable across
        tokenizers and model kinds), ``{tokens, chars}``, all over the text the model predicts: ``[UNK]`` targets
        (words outside a word vocabulary) are not scored, and ``{unk_tokens, unk_chars, unk_share}`` say how
        much of the text they cover.  With ``dynamic`` options, also ``"dynamic"``: the
        same text read once more with dynamic evaluation (:mod:`charrnn.dynamic`).

        A labelled run (:mod:`charrnn.labels`) is scored on each label's validation text under its label, with
        each label's figures under ``"labels"`` (only ``label``'s with ``label``); a ``corpus`` is read under
        ``label`` (default: unlabelled)."""
        label_id = label_index(label, self.labels)      # one label: a mix is generated, not evaluated
        if self.labels and dynamic is not None:
            raise OptionError("dynamic", "applies to runs without labels in this version; drop it")
        if self.labels and corpus is None:
            return self._evaluate_labels(label, seq_len, n_streams)
        ids, chars = held_out_ids(self.config, self.vocab, corpus, val_fraction)
        unk_chars = unknown(self.vocab, ids[1:], chars)[1]
        # The step sizes first: they refuse a segment the memory or the training split cannot hold.
        rms = self._gradient_rms(dynamic) if dynamic is not None else None
        result = evaluate(self.model, ids, seq_len=seq_len, n_streams=n_streams, device=self.device, chars=chars,
                          unk_chars=unk_chars, label=label_id)
        if dynamic is not None:
            result["dynamic"] = dynamic_evaluate(self.model, ids, rms, dynamic, chars, unk_chars)
        return result

    def _evaluate_labels(self, label: str | None, seq_len: int, n_streams: int) -> dict:
        """The run's validation: each label's validation text (as training split it) under its label."""
        corpus, val_fraction = recorded_split(self.config)
        norm = self.config.get("training", {})
        labelled = load_labelled(corpus, lowercase=norm.get("lowercase", False),
                                 newlines_to_spaces=norm.get("newlines_to_spaces", False), progress=False)
        parts = label_parts(labelled.splits(val_fraction, self.vocab), self.vocab)
        known = {name: k for k, name in enumerate(self.labels)}
        parts = {known[labelled.labels[k]]: part for k, part in parts.items() if labelled.labels[k] in known
                 and (label is None or labelled.labels[k] == label)}
        if not parts:
            raise OptionError("label", "{value} has no validation text in {corpus}; give another label or "
                                       "{corpus}", value=label or "no label", corpus=corpus)
        return evaluate_labels(self.model, parts, self.labels, seq_len=seq_len, n_streams=n_streams,
                               device=self.device)

    def _gradient_rms(self, options: DynamicOptions) -> dict[str, torch.Tensor]:
        return gradient_rms(self.model, training_ids(self.config, self.vocab), options.dynamic_segment)

    def adapted(self, text: str, options: DynamicOptions | None = None, *, progress: bool = False,
                log: Callable[[str], None] | None = None, what: str = "the text to adapt to") -> LanguageModel:
        """A copy of this model adapted to ``text`` (a style sample, a user's own writing) by reading it with
        dynamic evaluation; this model and the run's files are not changed.  ``progress`` shows a progress bar
        on a text that takes a while; ``log(message)`` receives the warning for a text of which the model knows
        nothing (default: stderr); ``what`` names the text in the messages."""
        options = (options or DynamicOptions()).validate()
        ids = self.vocab.encode(text)
        if len(ids) < 2:
            raise CharRNNError(f"{what} is shorter than two tokens; give a longer one")
        adapter = Adapter(self.model, self._gradient_rms(options), options)
        if not np.any(ids != UNK_ID):
            log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
            log(f"warning: no {'character' if self.vocab.kind == 'char' else 'token'} of {what} is in the model's "
                "vocabulary (all are read as [UNK]): the model learns nothing from it about what to write")
        adapter.read_all(ids, progress=progress)
        return LanguageModel(dataclasses.replace(self.run, model=adapter.model), self.device, int8=self.int8)


def load(model: str | Path, *, weights: str = "best", device: str = "cpu", int8: bool = False):
    """Load a model for generation and evaluation, on ``device`` (default CPU):

    - a run directory (best weights unless ``weights="latest"``; ``int8=True`` makes generation run
      its per-character step with int8 weights, CPU only): a :class:`LanguageModel`;
    - a Hugging Face causal language model (a ``save_pretrained`` directory, or a hub id; needs the
      ``hf`` extra): a :class:`charrnn.hf.PretrainedModel`, with the same interface.
    """
    from . import hf

    dev = resolve_device(device)
    model = shipped.resolve(model)          # charrnn's own shipped models by name (base-en)
    fine_tuned = ckpt.is_hf_run(model)
    if fine_tuned or hf.is_pretrained(model):
        extra = [name for name, given in (("weights", weights != "best"), ("int8", int8)) if given]
        if extra:
            raise OptionError(extra[0], "applies only to charrnn's own models; a Hugging Face model has one set of "
                                        "float weights: drop it")
        return hf.load_run(model, device=dev) if fine_tuned else hf.load(model, device=dev)
    return LanguageModel(ckpt.load_run(model, weights=weights, device=dev), dev, int8=int8)
