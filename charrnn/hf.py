"""Pretrained Hugging Face causal language models behind charrnn's commands (the ``hf`` extra).

A directory written by ``save_pretrained`` (config, weights and tokenizer), or a model id on the
Hugging Face hub, loads as a :class:`PretrainedModel`: the contract of :mod:`charrnn.interfaces` as
:class:`charrnn.api.LanguageModel` has it (``generate``, ``stream``, ``evaluate``, ``sampler.beam``), run by
charrnn's own sampler through a :class:`PretrainedReader`, so every option means what it means for a character RNN.

How a transformer fits that sampler:

- Ids are shifted up by one, so that id 0 is ``[UNK]`` as in every charrnn vocabulary (never
  generated).  The tokenizer's special tokens (end of text, padding, ...) are never generated
  either, so every sample reaches ``--length`` characters.
- The recurrent state is the key/value cache with its attention mask (:class:`KVState`).
  Prompts of different lengths are padded on the left.  A step consumes its state (the cache
  grows in place); beam search copies it when it re-orders the beams.
- The prompt is tokenized as it is, as ``transformers`` does (no token healing).
- Text is decoded with the tokenizer, the whole continuation at once behind a few prompt
  tokens (:class:`DecodeStream`), so any tokenizer decodes as it would in context.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .errors import CharRNNError, OptionError
from .evaluation import LN2, held_out_text, recorded_split
from .fileio import sha256_of
from .generator import Generator
from .hardware import check_rows_fit
from .interfaces import Capabilities
from .sampling import Sampler

INSTALL = 'pip install -e ".[hf]"'
WEIGHT_FILES = ("*.safetensors", "*.bin")   # a save_pretrained folder's weights, in the order transformers prefers
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONTEXT_TOKENS = 8      # prompt tokens decoded before a continuation (see DecodeStream)
HUB_TIMEOUT_S = 3
TOKENIZER_CONFIG = "tokenizer_config.json"    # written by every tokenizer's save_pretrained, never by charrnn


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CharRNNError("a Hugging Face model needs the Python package 'transformers'; install the hf extra: "
                           + INSTALL) from None
    return transformers


def is_pretrained(name) -> bool:
    """Whether ``name`` is a Hugging Face model: a directory whose config.json names a ``model_type``, or
    (nothing of that name here, and transformers installed) a name shaped like a hub id, e.g. ``gpt2`` or
    ``openai-community/gpt2``."""
    path = Path(name)
    try:
        is_dir = path.is_dir()
    except OSError:         # e.g. a name too long for the file system: no model of ours
        return False
    if is_dir:
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            config = None
        if isinstance(config, dict):
            return "model_type" in config
        return (path / TOKENIZER_CONFIG).is_file()     # a model folder whose config.json is damaged
    import importlib.util

    return (not path.exists() and bool(HUB_ID.match(str(name))) and not str(name).lower().endswith(".onnx")
            and importlib.util.find_spec("transformers") is not None)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _hub_problem() -> str | None:
    """Why the hub cannot be reached (None: it can), found in a few seconds rather than after the
    download's own retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e.strerror or _first_line(e)})"
    return None


def _from_pretrained(cls, name: str, what: str, **kw):
    """``cls.from_pretrained(name)``: from the local cache first, from the hub only when it can be reached."""
    local = Path(name).is_dir()
    try:
        return cls.from_pretrained(name, local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - a damaged file raises whatever its parser raises
        if local:
            raise _unloadable(Path(name), what, e) from None
        if not isinstance(e, OSError):     # in the cache, but damaged
            raise CharRNNError(f"the {what} of {name} in the Hugging Face cache cannot be loaded "
                               f"({type(e).__name__}: {_first_line(e)}); download it again") from None
    problem = _hub_problem()
    if problem:
        save = (f"python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
                f"[c.from_pretrained('{name}').save_pretrained('DIR') for c in (M, T)]\"")
        raise CharRNNError(f"{name} is no run directory or model directory here, and the Hugging Face hub is out of "
                           f"reach to download it ({problem}); with network access run `{save}`, then give DIR")
    try:
        return cls.from_pretrained(name, **kw)
    except OSError as e:
        raise CharRNNError(f"{name} is no run directory here, nor a Hugging Face model the hub has "
                           f"({_first_line(e)}); check the name") from None


def _unloadable(folder: Path, what: str, e: Exception) -> CharRNNError:
    """The one-line error for a model folder whose ``what`` did not load (``e``): the file that is damaged, where
    one is."""
    for path in sorted(folder.iterdir()):
        problem = _file_problem(path)
        if problem:
            return CharRNNError(f"{path} is damaged ({problem}); download the model again, or save it again with "
                                "save_pretrained")
    return CharRNNError(f"{folder} has no {what} a Hugging Face library can load ({_first_line(e)}); give a "
                        "directory written by save_pretrained, with its tokenizer")


def _file_problem(path: Path) -> str | None:
    """What is wrong with a JSON or safetensors file of a model folder (None: nothing, or another kind of file)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            return f"it cannot be read: {e.strerror or _first_line(e)}"
        except (ValueError, RecursionError) as e:      # not UTF-8, or not JSON
            return f"not JSON: {_first_line(e)}"
        return None if isinstance(data, dict) else f"it holds a JSON {type(data).__name__}, not an object"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt"):
                return None
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
            return f"not a safetensors file: {_first_line(e)}"
    return None


@contextlib.contextmanager
def _errors_only(transformers):
    """transformers' warnings silenced (a refused model is one line, not a load report and a line)."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load(name, *, device: torch.device) -> PretrainedModel:
    """A Hugging Face causal language model (directory or hub id) on ``device``, after checking that it is one:
    a decoder, with a tokenizer whose ids all fit its embedding, and every weight in its files."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()      # charrnn prints one line per command, not bars
    name = str(name)
    with _errors_only(transformers):
        config = _from_pretrained(transformers.AutoConfig, name, "config.json")
        if config.is_encoder_decoder or type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
            raise _not_causal(name, config, "an encoder-decoder" if config.is_encoder_decoder else
                              "transformers has no causal language model class for it")
        tokenizer = _from_pretrained(transformers.AutoTokenizer, name, "tokenizer")
        _check_tokenizer(name, tokenizer)
        model, info = _from_pretrained(transformers.AutoModelForCausalLM, name, "model weights", config=config,
                                       output_loading_info=True, ignore_mismatched_sizes=True)
    _check_weights(name, info)
    model = model.to(device).eval()
    if _sees_ahead(model):
        raise _not_causal(name, config, "its predictions see the tokens they predict: an encoder")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise CharRNNError(f"{name}'s tokenizer has {len(tokenizer)} tokens but its model embeds {rows}: a text with "
                           f"a token from id {rows} on cannot be read; the tokenizer belongs to another model, give "
                           "the model's own")
    return PretrainedModel(name, model, tokenizer, device)


def _not_causal(name: str, config, why: str) -> CharRNNError:
    return CharRNNError(f"{name} is a {config.model_type} model, not a causal language model ({why}); give a model "
                        "that generates text, such as gpt2")


def _check_tokenizer(name: str, tokenizer) -> None:
    """Refuse a tokenizer with no tokens but its special ones (a folder without tokenizer files loads as one), and
    one that cannot read a word (files of valid JSON but wrong values)."""
    special = set(tokenizer.all_special_ids)
    if all(i in special for i in tokenizer.get_vocab().values()):
        files = ", ".join(dict.fromkeys(["tokenizer.json", *type(tokenizer).vocab_files_names.values()]))
        raise CharRNNError(f"{name} has no tokenizer files (none of {files}): its tokenizer would read no text; "
                           "save the model's tokenizer into it with save_pretrained")
    try:
        tokenizer("The end.", verbose=False)
    except Exception as e:  # noqa: BLE001 - whatever a damaged setting makes the tokenizer raise
        raise CharRNNError(f"{name}'s tokenizer cannot read text ({type(e).__name__}: {_first_line(e)}): its files "
                           "are damaged; download the model again, or save it again with save_pretrained") from None


def _check_weights(name: str, info: dict) -> None:
    """Refuse weight files that lack some of the model's tensors or hold them in other shapes (transformers would
    fill those with random numbers)."""
    wrong = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if wrong:
        raise CharRNNError(f"{name}'s weights lack {len(wrong)} of its model's tensors or hold them in other shapes "
                           f"(first: {wrong[0]}): they are damaged or another model's; download the model again")


@torch.inference_mode()
def _sees_ahead(model) -> bool:
    """Whether the model's prediction at the first position changes with the token after it (attention that
    looks both ways, as an encoder's): a causal language model's never does."""
    logits = model(input_ids=torch.tensor([[0, 0], [0, 1]], device=model.device)).logits[:, 0].float()
    return not torch.allclose(logits[0], logits[1], rtol=1e-3, atol=1e-3 * float(logits.abs().max()))


def text_config(model):
    """The configuration of the model's text part (the model's own, but for a model of several parts)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_of(model) -> int | None:
    """The most tokens the model reads at once (None: no limit it declares)."""
    config = text_config(model)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class PretrainedVocab:
    """The tokenizer's ids, shifted up by one: 0 is ``[UNK]``.  ``banned``: the shifted ids never generated
    (the tokenizer's special tokens, and output rows the tokenizer has no token for)."""

    kind = "pretrained"

    def __init__(self, tokenizer, size: int):
        self.tokenizer, self.size = tokenizer, size
        self.banned = sorted({i + 1 for i in tokenizer.all_special_ids if i < size} | set(range(len(tokenizer) + 1,
                                                                                                 size + 1)))

    def __len__(self) -> int:
        return self.size + 1

    def encode(self, text: str) -> torch.Tensor:
        """The shifted ids of ``text`` (the tokenizer's special tokens added, e.g. a beginning-of-text token)."""
        return torch.tensor(self.tokenizer(text, verbose=False)["input_ids"], dtype=torch.long) + 1

    def steps_for(self, length: int) -> int:
        """The most tokens ``length`` characters can take: a byte-level token can be one byte of four."""
        return 4 * length

    def unknown(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` the tokenizer reads as its unknown token (none for byte-level ones)."""
        unk = self.tokenizer.unk_token_id
        if unk is None or not text:
            return []
        found = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        pieces = [text[a:b] for (a, b), i in zip(found["offset_mapping"], found["input_ids"]) if i == unk]
        return list(dict.fromkeys(pieces))


class KVState:
    """A batch's key/value cache and attention mask: the "state" charrnn's sampler and beam search carry."""

    def __init__(self, cache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask

    def select_rows(self, index: torch.Tensor) -> KVState:
        """Rows ``index`` of the batch, in a new cache (beam search keeps the old state too)."""
        cache = copy.deepcopy(self.cache)
        cache.reorder_cache(index)
        return KVState(cache, self.mask.index_select(0, index))


class PretrainedStepper:
    """``step(ids (batch,), state) -> (logits (batch, vocab + 1), state)``, as :class:`charrnn.stepper.Stepper`."""

    backend = "python"

    def __init__(self, model, vocab: PretrainedVocab):
        self.model, self.vocab = model, vocab
        takes = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in takes
        self.cache_arg = "cache" if "cache" in takes else "past_key_values"     # renamed in transformers 5.25
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self.config = text_config(model)
        self.context = context_of(model)
        self._banned = torch.tensor(vocab.banned, dtype=torch.long)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's logits ``(batch, size)`` as charrnn's: ``[UNK]`` in front, banned ids at -inf."""
        out = torch.cat([raw.new_full((raw.shape[0], 1), float("-inf")), raw[:, : self.vocab.size]], 1).float()
        out[:, self._banned.to(out.device)] = float("-inf")
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """Model ids ``(batch, t)`` after ``cache`` -> the last position's raw logits and the cache."""
        if self.context is not None and mask.shape[1] > self.context:
            raise OptionError("length", "the text reached this model's context of {n} tokens; ask for a shorter "
                              "{length} or prompt", n=self.context)
        kw = {self.cache_arg: cache, **self.last_only}
        if self.takes_positions:
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        return out.logits[:, -1], out[self.cache_arg]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        mask = torch.cat([state.mask, state.mask.new_ones(len(ids), 1)], 1)
        raw, cache = self.forward((ids - 1)[:, None], mask, state.cache)
        return self.logits(raw), KVState(cache, mask)


class DecodeStream:
    """The new text of ``rows`` samples, one shifted id each per ``push``, cut at ``length`` characters: the
    interface of :class:`charrnn.tokens.TextStream`, for any tokenizer.

    Each row's continuation is decoded whole behind the prompt's last few tokens (a tokenizer that joins
    words with spaces, or drops a leading space, decodes it as it would in context); new text is held
    back while it ends inside a character, for at most three tokens (a character has at most four bytes:
    after that the bytes are invalid for good, and decode as U+FFFD).
    """

    def __init__(self, tokenizer, contexts: list[list[int]], length: int):
        self.tokenizer, self.length, self.contexts = tokenizer, length, contexts
        self.starts = [len(self._decode(c)) for c in contexts]
        self.ids: list[list[int]] = [[] for _ in contexts]
        self.chars = [0] * len(contexts)
        self.held = [0] * len(contexts)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids) -> list[str]:
        pieces = []
        for r, i in enumerate(ids):
            self.ids[r].append(int(i) - 1)
            text = self._decode(self.contexts[r] + self.ids[r])[self.starts[r]:]
            self.held[r] = self.held[r] + 1 if text.endswith("\ufffd") and self.held[r] < 3 else 0
            piece = "" if self.held[r] else text[self.chars[r]: self.length]
            self.chars[r] += len(piece)
            pieces.append(piece)
        return pieces

    @property
    def done(self) -> bool:
        return all(c >= self.length for c in self.chars)

    def select_rows(self, index) -> DecodeStream:
        """A stream of the rows ``index`` of this one, each where it is (beam search re-orders its beams)."""
        rows = [int(r) for r in index]
        new = copy.copy(self)
        new.contexts, new.starts = [self.contexts[r] for r in rows], [self.starts[r] for r in rows]
        new.ids = [list(self.ids[r]) for r in rows]
        new.chars, new.held = [self.chars[r] for r in rows], [self.held[r] for r in rows]
        return new


class PretrainedReader:
    """A transformer as :class:`charrnn.sampling.Sampler` reads it (its :class:`charrnn.interfaces.Reader`), so
    that the sampler's generation, streaming and beam search run it: prompts padded on the left into one batch,
    one step of :class:`PretrainedStepper` per token.  Requests are stepped one by one in the server (their
    caches differ in length), and no prompt cache is kept."""

    batchable = False
    prompt_cache = None

    def __init__(self, model, vocab: PretrainedVocab, device: torch.device):
        self.model, self.vocab, self.device = model, vocab, device
        self.stepper = PretrainedStepper(model, vocab)

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """The shifted ids the model reads for ``prompt`` (an empty prompt starts after a newline), leaving room in
        the model's context for a token to be generated."""
        ids = self.vocab.encode(prompt or "\n")
        if len(ids) == 0:
            raise OptionError("prompt", "gives no tokens with this model's tokenizer; give some text to continue")
        context = self.stepper.context
        if context is not None and len(ids) >= context:
            raise OptionError("prompt", "is {tokens} tokens with this model's tokenizer, and its context holds {n}, "
                                        "generated tokens included; give a shorter one", tokens=len(ids), n=context)
        return ids

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, list[str]]:
        return self.prompt_ids(prompt), self.vocab.unknown(prompt)

    def healed(self, prompt: str) -> tuple[torch.Tensor, bytes]:
        return self.prompt_ids(prompt), b""

    def token_text(self, i: int) -> str:
        return self.vocab.tokenizer.decode([i - 1]) if i else "[UNK]"

    def check_fits(self, option: str, value: int, rows: int, length: int = 0) -> None:
        """Refuse a batch whose key/value caches, filled to the model's context, and logits (float32, a few
        copies) could not fit in the device's memory."""
        config = self.stepper.config
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
        width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1)
        per_row = 4 * (2 * layers * width * (self.stepper.context or 1024) + 4 * len(self.vocab)) + 4 * length
        check_rows_fit(self.device, option, value, rows, per_row)

    @torch.inference_mode()
    def prime(self, prompts) -> tuple[torch.Tensor, KVState]:
        """Every distinct prompt read once, padded on the left into one batch; the last logits and the state."""
        distinct = list(dict.fromkeys(prompts))
        rows = [self.prompt_ids(p) - 1 for p in distinct]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
        transformers = _transformers()
        raw, cache = self.stepper.forward(ids.to(self.device), mask.to(self.device), transformers.DynamicCache())
        state = KVState(cache, mask.to(self.device))
        index = torch.tensor([distinct.index(p) for p in prompts], device=self.device)
        if len(prompts) != len(distinct) or len(distinct) > 1:
            state = state.select_rows(index)
        return self.stepper.logits(raw).index_select(0, index), state

    def text_stream(self, prompts, length: int) -> DecodeStream:
        contexts = [(self.prompt_ids(p) - 1)[-CONTEXT_TOKENS:].tolist() for p in prompts]
        return DecodeStream(self.vocab.tokenizer, contexts, length)


class PretrainedModel(Generator):
    """A Hugging Face causal language model, loaded for generation and evaluation."""

    capabilities = Capabilities(complete=True, beam_search=True, evaluate=True, windows=True, serve=True)
    int8 = False

    def __init__(self, name: str, model, tokenizer, device: torch.device):
        self.name, self.model, self.tokenizer, self.device = name, model, tokenizer, device
        head = model.get_output_embeddings()
        size = head.weight.shape[0] if head is not None else model.config.vocab_size
        self.vocab = PretrainedVocab(tokenizer, size)
        self.sampler = Sampler(PretrainedReader(model, self.vocab, device))
        self.context = self.sampler.stepper.context

    @property
    def label(self) -> str:
        """``Hugging Face`` and the model's type (``gpt2``, ``llama``, ...)."""
        return f"Hugging Face {self.model.config.model_type}"

    def describe(self) -> dict:
        """What the server's ``/v1/model`` says about the model."""
        return {"model": Path(self.name).name if Path(self.name).is_dir() else self.name, "kind": "huggingface",
                "model_type": self.model.config.model_type, "context": self.context,
                "parameters": sum(p.numel() for p in self.model.parameters()), "tokenizer": self.vocab.kind,
                "vocabulary": len(self.tokenizer), "device": str(self.device), "int8": False}

    def evaluate(self, corpus: str | None = None, *, val_fraction: float | None = None, window: int | None = None,
                 stride: int | None = None) -> dict:
        """Loss on all of ``corpus`` (or its last ``val_fraction``, the validation split a charrnn run with
        that --val-fraction holds out): ``{loss, perplexity}`` per token, ``{bpc, nats_per_char}`` per
        character, ``{tokens, chars, window, stride}``.

        The text is read in windows of ``window`` tokens (default: the model's context) that start
        ``stride`` tokens apart (default: half a window); each token is scored once, in the first window
        that holds it past the previous window's end, so every token but the first windows' has at least
        ``window - stride`` tokens of context.
        """
        if corpus is None:
            raise OptionError("corpus", "a pretrained model has no validation split of its own; pass {corpus} (and "
                              "{val_fraction} to evaluate on a corpus's validation split)")
        window, stride = default_windows(self.context, window, stride)
        if not 2 <= window <= (self.context or window):
            raise OptionError("window", "must be between 2 and the model's context ({n}), got {value}",
                              value=window, n=self.context)
        if not 1 <= stride < window:
            raise OptionError("stride", "must be at least 1 and below {window} ({n}), got {value}", value=stride,
                              n=window)
        ids, chars = text_ids(self.tokenizer, held_out_text(corpus, val_fraction))
        if len(ids) < 2:
            raise CharRNNError(f"corpus {corpus} is shorter than two tokens; nothing to evaluate")
        return window_scores(self.model, ids, chars, window, stride, self.device)


def default_windows(context: int | None, window: int | None = None, stride: int | None = None) -> tuple[int, int]:
    """``window`` and ``stride``, or their defaults for a model of ``context`` tokens: a whole context (1024 when
    the model declares none) and half of one."""
    window = window or context or 1024
    return window, stride or max(1, window // 2)


def text_ids(tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """``text``'s token ids, and the characters the tokens after the first (those a model predicts) cover."""
    found = tokenizer(text, return_offsets_mapping=True, verbose=False)
    ids = torch.tensor(found["input_ids"], dtype=torch.long)
    return ids, len(text) - (found["offset_mapping"][0][1] if len(ids) else 0)


def window_scores(model, ids: torch.Tensor, chars: int, window: int, stride: int, device: torch.device) -> dict:
    """:meth:`PretrainedModel.evaluate`'s figures for the token ``ids`` of a text whose predicted tokens cover
    ``chars`` characters, read in windows of ``window`` tokens ``stride`` apart."""
    total, done = _windows(model, ids, window, stride, device)
    loss = total / done
    return {"loss": loss, "bpc": total / chars / LN2, "nats_per_char": total / chars,
            "perplexity": math.exp(min(loss, 700)), "tokens": done, "chars": chars, "window": window,
            "stride": stride}


@torch.inference_mode()
def _windows(model, ids: torch.Tensor, window: int, stride: int, device: torch.device) -> tuple[float, int]:
    """Summed loss (nats) of ``ids[1:]``, each scored once, and how many were scored."""
    was_training = model.training
    model.eval()
    total, scored_to = 0.0, 1           # ids[:scored_to] are scored (the first is never predicted)
    try:
        for begin in range(0, len(ids) - 1, stride):
            end = min(begin + window, len(ids))
            x = ids[begin:end].to(device)
            logits = model(input_ids=x[None]).logits[0, :-1].float()
            new = scored_to - (begin + 1)       # targets x[1:] before this index were scored already
            total += float(F.cross_entropy(logits[new:], x[1:][new:], reduction="sum"))
            scored_to = end
            if end == len(ids):
                break
    finally:
        model.train(was_training)
    return total, scored_to - 1


# --------------------------------------------------------------------------- runs fine-tuned from a model


def _peft():
    try:
        import peft
    except ImportError:
        raise CharRNNError("LoRA adapters need the Python package 'peft'; install the hf extra: " + INSTALL) from None
    return peft


@contextlib.contextmanager
def quiet_peft():
    """peft without the warnings a user can do nothing about: it asks transformers a deprecated question, and
    says that it sets fan_in_fan_out for GPT-2's Conv1D layers itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out")
        yield


def weights_digest(name: str) -> str:
    """The sha256 of a Hugging Face model's weight files (a folder's, or a hub id's in the local cache), in order
    of their names; what a fine-tuned run records of the model it started from."""
    folder = Path(name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - not in the cache, in whatever way
            raise CharRNNError(f"the weights of {name} are not in the Hugging Face cache ({_first_line(e)}); "
                               "download the model again") from None
    for pattern in WEIGHT_FILES:
        files = sorted(folder.glob(pattern))
        if files:
            return sha256_of(files)
    raise CharRNNError(f"{name} has no weight files ({', '.join(WEIGHT_FILES)}); give a folder written by "
                       "save_pretrained")


def load_run(run, *, device: torch.device) -> FineTunedModel:
    """A run fine-tuned from a Hugging Face model (:mod:`charrnn.hf_training`): its ``hf/`` folder, the whole
    model, or a LoRA adapter merged into the model it names (checked against the sha256 the run recorded)."""
    run = Path(run)
    config = ckpt.read_config(run)
    folder = run / ckpt.HF_FOLDER
    if not folder.is_dir() and (run / (ckpt.HF_FOLDER + ".old")).is_dir():     # killed while swapping folders
        folder = run / (ckpt.HF_FOLDER + ".old")
    if not folder.is_dir():
        raise CharRNNError(f"run {run} has no {ckpt.HF_FOLDER}/ folder (its model); train it again with --force")
    init = config.get("init") or {}
    if not config["model"].get("lora"):
        loaded = load(folder, device=device)
        return FineTunedModel(run, config, loaded.model, loaded.tokenizer, device)
    base = str(init.get("from"))
    if weights_digest(base) != init.get("sha256"):
        raise CharRNNError(f"the weights of {base}, which run {run}'s LoRA adapter was trained on, changed since "
                           "(another sha256); put the model it started from back there")
    loaded = load(base, device=device)
    try:
        with quiet_peft():
            model = _peft().PeftModel.from_pretrained(loaded.model, folder).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - a damaged file raises whatever its parser raises
        raise _unloadable(folder, "LoRA adapter", e) from None
    return FineTunedModel(run, config, model.eval(), loaded.tokenizer, device)


class FineTunedModel(PretrainedModel):
    """A run fine-tuned from a Hugging Face model: a :class:`PretrainedModel` that evaluates on the run's own
    validation split by default, as ``charrnn eval RUN`` does for every run."""

    def __init__(self, run: Path, config: dict, model, tokenizer, device: torch.device):
        super().__init__(str(run), model, tokenizer, device)
        self.config = config

    @property
    def label(self) -> str:
        lora = self.config["model"].get("lora")
        return f"fine-tuned {self.model.config.model_type}" + (f" (LoRA rank {lora}, merged)" if lora else "")

    def describe(self) -> dict:
        return {**super().describe(), "run": Path(self.name).name, "init": self.config.get("init")}

    def evaluate(self, corpus: str | None = None, *, val_fraction: float | None = None, window: int | None = None,
                 stride: int | None = None) -> dict:
        if corpus is None:
            corpus, val_fraction = recorded_split(self.config)
        return super().evaluate(corpus, val_fraction=val_fraction, window=window, stride=stride)
