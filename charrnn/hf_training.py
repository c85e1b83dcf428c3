"""Fine-tuning a Hugging Face causal language model: ``charrnn train CORPUS --out DIR --init-from MODEL`` (a
``save_pretrained`` folder or a hub id), every weight, or with ``--lora RANK`` LoRA adapters (through peft).

:class:`HFTrainer` is :class:`charrnn.training.Trainer` with the model's own weights and tokenizer: the same
loop, stopping rules, hooks, progress, samples, atomic checkpoints, exact resume, Ctrl-C, writer lock and data
parallelism.  What differs:

- The text is read with the model's tokenizer.  The training and validation splits are cut by characters as
  in every run, then each is tokenized alone; training windows are ``--seq-len`` tokens, at most the model's
  context.
- Validation scores the validation text as ``charrnn eval`` scores a Hugging Face model (windows of the
  model's context, half a window apart; :func:`charrnn.hf.window_scores`): bits per character over the
  characters of the predicted tokens, on the same scale as every run.
- The run's best model is the folder ``hf/`` (:data:`charrnn.checkpoint.HF_FOLDER`), written at the start and
  at each new best: ``save_pretrained``'s weights and the tokenizer, which ``transformers`` loads as it is; with
  ``--lora``, peft's adapter, whose ``adapter_config.json`` names the model it adapts (config.json's ``init``
  holds that model's sha256).  :func:`charrnn.hf.load_run` loads it for generate, eval and serve.
- Checkpoints hold the weights that train (a tied output layer once; with LoRA, the adapters) and the optimizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import hf
from .config import build_config
from .data import WindowBatches, split_train_val
from .errors import CharRNNError, OptionError
from .fileio import replace_folder, reporting_full_disk
from .sampling import Sampler
from .tokenized import corpus_text
from .training import Trainer

SAMPLE_MARGIN = 8       # context tokens a sample during training leaves free (for characters split between tokens)
# The options of charrnn's own models: a Hugging Face model brings its own architecture and tokenizer.
NOT_FOR_PRETRAINED = ("arch", "embed", "hidden", "layers", "dropout", "weight_drop", "tokenizer", "max_vocab",
                      "stateful", "sampled_softmax", "lowercase", "newlines_to_spaces")


def options(given: dict, source: str) -> dict:
    """The training options ``given`` for a run that starts from the Hugging Face model ``source``; an option of
    charrnn's own models, given with a value other than its default, is refused, naming it."""
    defaults = build_config(epochs=1).to_dict()
    defaults.update(defaults.pop("model"))
    for name in NOT_FOR_PRETRAINED:
        if given.get(name) is not None and given[name] != defaults[name]:
            raise OptionError(name, "applies to charrnn's own models; {init_from} {source} is a Hugging Face model "
                                    "with its own architecture and tokenizer: leave {" + name + "} out",
                              source=source)
    return given


class CausalLM(torch.nn.Module):
    """A Hugging Face model as the training step calls a charrnn model: ids in, logits out, no carried state.

    Its ``state_dict`` holds the weights that train: a tied output layer once, a LoRA adapter's base not at all.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.trainable = {name for name, p in self.named_parameters() if p.requires_grad}

    def forward(self, x, state=None, last_only: bool = False, features: bool = False):
        logits = self.model(input_ids=x, use_cache=False).logits
        return (logits[:, -1:] if last_only else logits), x.new_zeros(0)

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if k in self.trainable)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in missing if k in self.trainable]
        if strict and (missing or unexpected):
            raise RuntimeError(f"missing {missing[:1]}, unexpected {unexpected[:1]}")
        return missing, unexpected


def with_lora(model, rank: int):
    """``model`` with LoRA adapters of ``rank`` on every linear layer but the output (peft's ``all-linear``),
    scaled by 1 (alpha = rank), without dropout; only the adapters train."""
    width = getattr(hf.text_config(model), "hidden_size", None)
    if width and rank > width:
        raise OptionError("lora", "is {value}, but the model is {n} wide: a rank above its width adds weights and "
                                  "nothing else; give at most {n} (8 or 16 is usual)", value=rank, n=width)
    peft = hf._peft()
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    with hf.quiet_peft():
        return peft.get_peft_model(model, config)


def write_folder(model, tokenizer, folder: Path) -> None:
    """``model`` and ``tokenizer`` saved with ``save_pretrained`` into ``folder``, which is replaced whole: the
    files are written beside it first."""
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def write(new: Path) -> None:
        with hf.quiet_peft(), reporting_full_disk(folder, size):
            model.save_pretrained(new)
            tokenizer.save_pretrained(new)

    replace_folder(folder, write)


class HFTrainer(Trainer):
    """:class:`charrnn.training.Trainer` for a Hugging Face causal LM (see the module)."""

    keeps_latest = False    # trainer-state.pt holds the latest weights, hf/ the best: no third copy

    def _prepare(self, corpus, resume: bool, progress: bool) -> None:
        cfg = self.cfg
        source = self._source()
        self.tokenizer, self.vocab, self.context = source.tokenizer, source.vocab, source.context
        if self.context and cfg.seq_len > self.context:
            raise OptionError("seq_len", "is {value}, but {source} reads at most {n} tokens at once; give at most "
                                         "{n}", value=cfg.seq_len, source=cfg.init_from, n=self.context)
        torch.manual_seed(cfg.seed)     # the same adapters on every rank
        model = source.model.train()
        self.model = CausalLM(with_lora(model, cfg.lora) if cfg.lora else model)
        self._read(corpus)
        self.batches = WindowBatches(self.train_ids, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.window_step)
        self.scores_unk, self.proposal = False, None

    def _source(self) -> hf.PretrainedModel:
        """The model --init-from names, loaded and checked (a refusal names --init-from); ``init`` records it."""
        given = self.cfg.init_from
        # A folder by its absolute path: the LoRA adapter's config names the model it adapts by it.
        name = str(Path(given).resolve()) if Path(given).is_dir() else given
        try:
            source = hf.load(name, device=torch.device("cpu"))
            self.init = {"from": name, "kind": ckpt.HF_KIND, "sha256": hf.weights_digest(name)}
        except OptionError:
            raise
        except CharRNNError as e:
            raise OptionError("init_from", "{path}: {why}", path=given, why=str(e)) from None
        return source

    def _read(self, corpus) -> None:
        """The training and validation text, cut by characters, each tokenized alone."""
        cfg = self.cfg
        cut = len(split_train_val(corpus.ids, cfg.val_fraction)[0])
        self.train_text, self.val_text = corpus_text(corpus, 0, cut), corpus_text(corpus, cut)
        self.train_ids = np.asarray(self.tokenizer(self.train_text, verbose=False)["input_ids"], dtype=np.int64)
        self.val_ids, self.val_chars = hf.text_ids(self.tokenizer, self.val_text)
        if cfg.val_fraction and len(self.val_ids) < 2:
            raise OptionError("val_fraction", "gives a validation split of {n} token(s), too short to score; use a "
                                              "longer corpus or a larger {val_fraction}", n=len(self.val_ids))
        self.chars_per_token = self.chars_per_scored_token = len(self.train_text) / max(len(self.train_ids), 1)

    def _parameters(self) -> tuple[int, int]:
        """The model's parameters, and those of them that train."""
        params = list(self.model.model.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    def _config_json(self) -> dict:
        model = self.model.model
        params, trained = self._parameters()
        training = self.cfg.to_dict()
        del training["model"]
        return {"model": {"kind": ckpt.HF_KIND, "model_type": hf.text_config(model).model_type,
                          "parameters": params, "trained_parameters": trained, "lora": self.cfg.lora,
                          "context": self.context},
                "corpus": self.corpus.describe(), "training": training, "init": self.init}

    def _start_run(self) -> None:
        ckpt.start_run(self.run_dir, self._config_json(), None)
        self.save_best()

    def _saved(self) -> tuple[dict, dict]:
        config = ckpt.read_config(self.run_dir)
        if not ckpt.is_hf_config(config):
            raise OptionError("init_from", "is {source}, a Hugging Face model, but the run in {run} is a charrnn "
                                           "model's; resume it without {init_from}", source=self.cfg.init_from,
                              run=self.run_dir)
        saved = config.get("init") or {}
        if saved.get("sha256") != self.init["sha256"]:
            raise CharRNNError(f"the weights of {self.cfg.init_from}, which the run in {self.run_dir} started from, "
                               "changed since (another sha256); resume with the model it started from")
        if config["model"].get("lora") != self.cfg.lora:
            raise OptionError("lora", "is {value}, but the run in {run} was trained with {saved}; resume without "
                                      "changing it", value=self.cfg.lora, run=self.run_dir,
                              saved=config["model"].get("lora"))
        return config, ckpt.check_trainer_state(self.run_dir, self.model, self.optimizer)

    # ----------------------------------------------------------------- what the built-in hooks ask of the model

    def summary(self) -> str:
        model, cfg = self.model.model, self.cfg
        params, trained = self._parameters()
        precision = "bf16 autocast" if self.amp_dtype is not None else "fp32"
        return "\n".join([
            f"corpus {self.corpus.name}: {len(self.corpus):,} characters; train {len(self.train_ids):,}, validation "
            f"{len(self.val_ids):,} tokens of the model's tokenizer ({self.chars_per_token:.2f} characters each)",
            f"model {hf.text_config(model).model_type} (Hugging Face), {params:,} parameters, {trained:,} trained"
            + (f" (LoRA rank {cfg.lora})" if cfg.lora else ""),
            f"device {self.device}, {precision}; batch {cfg.batch_size} x {cfg.seq_len} tokens, {cfg.optimizer} lr "
            f"{cfg.lr}, {self.batches.nominal_steps_per_epoch()} steps per epoch"
            + (f"; data-parallel over {self.dist.world} processes" if self.dist.active else ""),
            f"started from {self.init['from']} (sha256 {self.init['sha256'][:12]})",
        ])

    def validate(self) -> dict:
        result = hf.window_scores(self.model.model, self.val_ids, self.val_chars, *hf.default_windows(self.context),
                                  self.device)
        return {**result, "unk_tokens": 0, "unk_chars": 0, "unk_share": 0.0}

    def save_best(self) -> None:
        write_folder(self.model.model, self.tokenizer, self.run_dir / ckpt.HF_FOLDER)

    def sampler(self):
        self.model.eval()       # no dropout in the samples (the sample hook puts the model back in training)
        return Sampler(hf.PretrainedReader(self.model.model, self.vocab, self.device))

    def sample_length(self, prompt: str) -> int:
        """--sample-length, cut to what the model's context leaves after the prompt (a token holds a character
        or more, but for the bytes of one character cut between tokens)."""
        if not self.context:
            return self.cfg.sample_length
        left = self.context - len(self.tokenizer(prompt)["input_ids"]) - SAMPLE_MARGIN
        return max(1, min(self.cfg.sample_length, left))

    def opening(self) -> str:
        return (self.val_text or self.train_text)[:40]
