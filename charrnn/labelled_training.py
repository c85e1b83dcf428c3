"""LabelledTrainer: :class:`charrnn.training.Trainer` for a labelled corpus (:mod:`charrnn.labels`).

What differs from a plain run: every label's text is split into training and validation parts on its own (the
last ``--val-fraction`` of each), so every label is validated; the training windows are cut from the labels'
training parts one after another, in label space (``label * vocab_size + id``), so each window's inputs carry
their label; validation scores each label's part under its own label, and the run's validation loss is their
mean over all the characters (each label weighing as much as its text).  ``config.json`` holds the label names
(``labels``); the metrics hold each label's validation bits/char (``val_labels``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import checkpoint as ckpt
from . import sources, tokenized
from .config import BPE_VOCAB
from .data import LabelTargets, StreamBatches, WindowBatches
from .errors import OptionError
from .evaluation import evaluate_labels, label_parts
from .hardware import check_model_fits
from .labels import LabelledCorpus
from .models.charlm import CharLM
from .tokens import TokenVocab
from .training import (Trainer, check_same_corpus, check_sampled_softmax, check_samples, resumed_vocab,
                       unigram_proposal)


def _source(cfg, resume: bool):
    """``--init-from``'s source (a charrnn run without labels, or a shipped model), when a new run starts from one."""
    if not cfg.init_from or resume:
        return None
    source = sources.read(cfg.init_from)
    if source.model.config.n_labels:
        raise OptionError("init_from", "{init_from} is a labelled run; a labelled run starts from a run without "
                                       "labels (or from scratch) in this version")
    return source


class LabelledTrainer(Trainer):
    """:class:`charrnn.training.Trainer` for a :class:`charrnn.labels.LabelledCorpus` (see the module)."""

    def _prepare(self, corpus: LabelledCorpus, resume: bool, progress: bool) -> None:
        cfg = self.cfg
        check_same_corpus(corpus, self.dist)
        source = _source(cfg, resume)
        self.init = source.describe() if source is not None else None     # config.json's "init" (resumed: its own)
        self.vocab = self._vocabulary(corpus, source, resume, progress)
        v = len(self.vocab)
        splits = corpus.splits(cfg.val_fraction, self.vocab)
        missing = [corpus.labels[k] for k, sp in enumerate(splits[1:], 1) if sp is None or not len(sp.train)]
        if missing:
            raise OptionError("labels", "label {names} has no text; give it .txt files or remove it",
                              names=", ".join(missing))
        self.val_parts = label_parts(splits, self.vocab)
        if cfg.val_fraction and not self.val_parts:
            raise OptionError("val_fraction", "leaves no label a validation text of two tokens; raise "
                                              "{val_fraction}")
        self.train_ids = np.concatenate([sp.train.astype(np.int64) + k * v for k, sp in enumerate(splits) if sp])
        self.val_ids = (np.concatenate([ids for ids, _, _ in self.val_parts.values()]) if self.val_parts
                        else np.zeros(0, np.int64))
        self.val_chars = sum(chars for _, chars, _ in self.val_parts.values())
        self.val_unk_chars = sum(unk for _, _, unk in self.val_parts.values())
        train_chars = sum(sp.train_chars for sp in splits if sp)
        self.chars_per_token = train_chars / max(len(self.train_ids), 1)
        unk_tokens, unk_chars = tokenized.unknown(self.vocab, self.train_ids % v, train_chars)
        self.scores_unk = unk_tokens > 0
        self.chars_per_scored_token = (train_chars - unk_chars) / max(len(self.train_ids) - unk_tokens, 1)
        batches = (StreamBatches(self.train_ids, cfg.seq_len, cfg.batch_size, cfg.seed) if cfg.stateful else
                   WindowBatches(self.train_ids, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.window_step))
        self.batches = LabelTargets(batches, v)
        check_sampled_softmax(cfg, v)
        self.proposal = unigram_proposal(self.train_ids % v, v) if cfg.sampled_softmax else None
        self.labels = corpus.labels
        self.model_cfg = cfg.model_config(v, len(corpus.labels))
        check_model_fits(self.model_cfg.training_bytes(cfg.batch_size // self.dist.world, cfg.seq_len),
                         self.model_cfg.num_parameters(), self.device)
        check_samples(self)
        torch.manual_seed(cfg.seed)
        self.model = CharLM(self.model_cfg)
        if source is not None:
            sources.load_weights(self.model, source)

    def _vocabulary(self, corpus: LabelledCorpus, source, resume: bool, progress: bool):
        """The run's vocabulary: a resumed run's own, its source's grown with the corpus's new characters, one word
        or BPE vocabulary learned from every label's training part, or the labels' characters."""
        cfg = self.cfg
        if resume:
            return self.dist.on_rank0(lambda: resumed_vocab(self.run_dir, cfg)) or corpus.vocab
        if source is not None:
            return sources.vocabulary(source, corpus.vocab)
        if cfg.tokenizer == "char":
            return corpus.vocab
        target = cfg.max_vocab or (BPE_VOCAB if cfg.tokenizer == "bpe" else 1 << 31)    # word: every token
        vocab = TokenVocab.train(cfg.tokenizer, corpus.training_text(cfg.val_fraction), target, progress)
        if cfg.max_vocab is not None and len(vocab) < cfg.max_vocab:
            raise OptionError("max_vocab", "is {value:,}, but the training parts give only {n:,} {kind} ids ([UNK] "
                                           "included); give at most {n:,}, or leave it out", value=cfg.max_vocab,
                              n=len(vocab), kind=cfg.tokenizer)
        return vocab

    def sampler(self):
        """Samples during training: unlabelled."""
        from .sampling import Sampler

        return Sampler(self.model, self.vocab, labels=self.labels)

    def _config_json(self) -> dict:
        return {**super()._config_json(), "labels": self.labels}

    def _saved(self) -> tuple[dict, dict]:
        config = ckpt.read_config(self.run_dir)
        if config.get("labels") != self.labels:
            raise OptionError("labels", "the run in {run} was trained on the labels {saved}, this corpus has {now}; "
                                        "resume with the run's labelled corpus", run=self.run_dir,
                              saved=", ".join(config.get("labels") or ["none"]), now=", ".join(self.labels))
        return super()._saved()

    def validate(self) -> dict:
        """Each label's validation part scored under its label (:func:`charrnn.evaluation.evaluate_labels`)."""
        cfg = self.cfg
        return evaluate_labels(self.model, self.val_parts, self.labels, seq_len=max(cfg.seq_len, 256),
                               n_streams=cfg.eval_streams, device=self.device, amp_dtype=self.amp_dtype,
                               dist=self.dist)

    def summary(self) -> str:
        chars = {name: len(ids) for name, ids in zip(self.labels, np.split(self.train_ids, self._cuts()))}
        counts = ", ".join(f"{name} {n:,}" for name, n in chars.items() if n)
        return super().summary() + f"\nlabels (training characters): {counts}"

    def _cuts(self) -> list[int]:
        v = len(self.vocab)
        return [int(np.searchsorted(self.train_ids // v, k)) for k in range(1, len(self.labels))]
