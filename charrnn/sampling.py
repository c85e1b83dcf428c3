"""The batched streaming sampler: a run's prompts read by the model's fused recurrent kernel in one
call, then one step of :class:`charrnn.stepper.Stepper` per token for all samples of the batch at once,
decoded by :class:`charrnn.decoding.Decoding`; and beam search over the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .decoding import Decoding
from .errors import CharRNNError, OptionError
from .hardware import check_sampling_fits
from .interfaces import Reader
from .labels import requested_weights
from .models.charlm import CharLM, State
from .options import SamplingParams, check_beam_width, check_shape, start_text
from .prompt_cache import PromptCache
from .stepper import Stepper
from .threads import ThreadPolicy
from .tokens import TextStream
from .vocab import UNK_ID, Vocab

# Prompt characters run through the model at once when priming.
PRIME_CHUNK = 1024
MAX_MIXES = 64          # mixes of labels a model keeps a block of its input table for


@dataclass
class Completion:
    """A generated text (prompt + continuation), why it ended (``"stop"``: a stop text, ``"length"``) and,
    when asked, one log-probability record per generated id."""

    text: str
    finish_reason: str
    logprobs: list[dict]


class Sampler:
    """Batched, streaming text generation and beam search from a model read through a
    :class:`charrnn.interfaces.Reader`: a charrnn run's (:class:`RunReader`), a pretrained transformer's
    (:class:`charrnn.hf.PretrainedReader`).  The model-specific methods below hand over to the reader."""

    def __init__(self, model: CharLM | Reader, vocab: Vocab | None = None, weights: str = "fp32",
                 backend: str = "auto", labels: Sequence[str] | None = None):
        """Over a :class:`CharLM` and its ``vocab`` (``weights`` and ``backend``: see :class:`Stepper`; ``labels``:
        a labelled run's label names), or over any :class:`charrnn.interfaces.Reader` given alone (a pretrained
        transformer's, :mod:`charrnn.hf`)."""
        self.reader: Reader = model if vocab is None else RunReader(model, vocab, weights, backend, labels)
        # What generation, decoding and the server's engine read of the model; fixed for the sampler's life.
        self.model, self.vocab, self.device = self.reader.model, self.reader.vocab, self.reader.device
        self.stepper = self.reader.stepper
        self.batchable = self.reader.batchable    # the server may step several requests as one batch

    @property
    def prompt_cache(self) -> PromptCache | None:
        """The reader's cache of the states after prompts read before: off unless asked for (the server
        turns it on)."""
        return self.reader.prompt_cache

    @prompt_cache.setter
    def prompt_cache(self, cache: PromptCache | None) -> None:
        self.reader.prompt_cache = cache

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, list[str]]:
        """Prompt ids and the characters that are not in the vocabulary (mapped to ``[UNK]``).

        An empty prompt starts from a newline when the vocabulary has one.
        """
        return self.reader.encode_prompt(prompt)

    def healed(self, prompt: str) -> tuple[torch.Tensor, bytes]:
        """The ids the model reads for ``prompt`` and the bytes its first generated token must start with
        (token healing: a word or BPE prompt may end inside a token; see :meth:`TokenVocab.heal`)."""
        return self.reader.healed(prompt)

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """The ids the model reads for ``prompt`` (what a repetition penalty counts as seen)."""
        return self.reader.prompt_ids(prompt)

    def prime(self, prompts: Sequence[str], offset: int = 0) -> tuple[torch.Tensor, list]:
        """Run each prompt through the model (under a label: ``offset``, the reader's ``label_offset``); the last
        logits ``(batch, vocab)`` and the state.

        After token healing the logits allow only the ids that start with the prompt's last token."""
        return self.reader.prime(prompts, offset) if offset else self.reader.prime(prompts)

    def check_label(self, label: str | None) -> None:
        """Refuse a ``label`` the model does not have, reading nothing (the server checks each request so)."""
        if label is not None:
            self._labelled().check_label(label)

    def label_offset(self, label: str | None) -> int:
        """What the ids of a run trained with --labels are shifted by under ``label`` (:mod:`charrnn.labels`)."""
        return self._labelled().label_offset(label) if label is not None else 0

    def _labelled(self) -> RunReader:
        if not isinstance(self.reader, RunReader):
            raise OptionError("label", "applies to a run trained with --labels; this model has no labels")
        return self.reader

    def token_text(self, i: int) -> str:
        """The text of id ``i`` alone (the alternatives of a log-probability record)."""
        return self.reader.token_text(i)

    @torch.inference_mode()
    def steps(self, prompts: Sequence[str], decoding: Decoding) -> Iterator[torch.Tensor]:
        """Yield the ids ``(batch,)`` that ``decoding`` chooses, one batched step each, until its steps are spent."""
        self.check_fits("num_samples", len(prompts), len(prompts))
        if decoding.steps_left <= 0:
            return
        offset = self.label_offset(decoding.params.label)
        with ThreadPolicy(on=self.device.type == "cpu") as threads:
            logits, state = self.prime(prompts, offset)
            while True:
                ids = decoding.choose(logits)
                yield ids
                if decoding.steps_left <= 0:
                    return
                threads.update()
                logits, state = self.stepper.step(ids + offset if offset else ids, state)

    def stream_ids(self, prompts: Sequence[str], length: int, params: SamplingParams | None = None,
                   **options) -> Iterator[torch.Tensor]:
        """Yield the next ids ``(batch,)`` ``length`` times, one batched step each (``params``, or ``options`` as
        keywords: see :class:`charrnn.options.SamplingParams`)."""
        return self.steps(prompts, Decoding(self, prompts, length, SamplingParams.of(params, **options), steps=length))

    def text_stream(self, prompts: Sequence[str], length: int) -> TextStream:
        """What turns the generated ids of ``prompts`` into their ``length`` characters of text."""
        return self.reader.text_stream(prompts, length)

    def decode(self, prompts: Sequence[str], decoding: Decoding) -> Iterator[tuple[list[str], list[list[dict]]]]:
        """Yield every sample's new text (and log-probability records), one step at a time, until every sample
        has finished (``decoding.finish`` says how)."""
        steps = self.steps(prompts, decoding)
        for ids in steps:
            yield decoding.read([ids.tolist()])
            if decoding.done:
                steps.close()
                return

    def stream(self, prompts: Sequence[str], length: int, params: SamplingParams | None = None,
               **options) -> Iterator[list[str]]:
        """Yield the new text of every sample, one step (one id each) at a time, until each has ``length``
        characters (one character per step for a character model) or met a ``stop`` text."""
        for texts, _ in self.decode(prompts, Decoding(self, prompts, length, SamplingParams.of(params, **options))):
            yield texts

    def check_fits(self, option: str, value: int, rows: int, length: int = 0) -> None:
        """:func:`charrnn.hardware.check_sampling_fits` for this model and device."""
        self.reader.check_fits(option, value, rows, length)

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[str] = "\n", length: int = 1000, num_samples: int = 1,
                 interrupted: Callable[[], bool] | None = None, params: SamplingParams | None = None,
                 **options) -> list[str]:
        """Complete texts (prompt + continuation), one per sample; shorter when ``interrupted()`` turns true
        (asked after each step).  ``params``, or ``options`` as keywords (``temperature=0.8, seed=1``; both: the
        keywords replace params' fields): see :class:`charrnn.options.SamplingParams`."""
        params = SamplingParams.of(params, **options)
        if self.vocab.kind != "char" or params.stop or params.logprobs is not None:
            return [c.text for c in self.complete(prompt, length, num_samples, interrupted, params)]
        prompts, decoding = self._checked(prompt, length, num_samples, params)
        # Kept on the device: on a GPU the host waits once, not per character.
        ids = torch.empty(len(prompts), length, dtype=torch.long, device=self.device)
        done = 0
        for done, step in enumerate(self.steps(prompts, decoding), 1):
            ids[:, done - 1] = step
            if interrupted is not None and interrupted():
                break
        return [p + self.vocab.decode(r) for p, r in zip(prompts, ids[:, :done].tolist())]

    @torch.inference_mode()
    def complete(self, prompt: str | Sequence[str], length: int, num_samples: int = 1,
                 interrupted: Callable[[], bool] | None = None, params: SamplingParams | None = None,
                 **options) -> list[Completion]:
        """One :class:`Completion` per sample: its text, why it ended and its log-probability records."""
        prompts, decoding = self._checked(prompt, length, num_samples, SamplingParams.of(params, **options))
        texts, records = list(prompts), [[] for _ in prompts]
        for new, recs in self.decode(prompts, decoding):
            texts = [t + n for t, n in zip(texts, new)]
            records = [a + b for a, b in zip(records, recs)]
            if interrupted is not None and interrupted():
                break
        return [Completion(t, f or "length", r) for t, f, r in zip(texts, decoding.finish, records)]

    def _checked(self, prompt: str | Sequence[str], length: int, num_samples: int,
                 params: SamplingParams) -> tuple[list[str], Decoding]:
        """The prompts of a batch and their decoding, once the batch's shape is checked and known to fit in memory
        (before anything of its size is made)."""
        rows = num_samples if isinstance(prompt, str) else len(prompt)
        check_shape(length, rows)
        self.check_fits("num_samples", rows, rows)
        self.check_fits("length", length, rows, length)
        prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
        return prompts, Decoding(self, prompts, length, params)

    @torch.inference_mode()
    def beam(self, prompt: str, length: int, beam_width: int, label: str | None = None) -> list[tuple[str, float]]:
        """The ``beam_width`` most likely continuations of ``prompt`` (``length`` characters each, ``[UNK]``
        excluded), as ``(prompt + continuation, total log-probability of the continuation)``, best first.

        Beam search from :mod:`charrnn.beam` over :class:`Stepper` (all beams in one batched step); a beam
        ends once its text has ``length`` characters (its last token may reach past them, and is cut).
        """
        from .beam import search

        check_shape(length)
        check_beam_width(beam_width)
        self.check_fits("beam_width", beam_width, int(beam_width) * self.model.config.vocab_size)
        if length == 0:
            return [(prompt, 0.0)]
        offset = self.label_offset(label)
        logits, state = self.prime([prompt], offset)
        end = logits.shape[-1]          # one more id, the beams' end: "this text has its length"

        def scored(out: torch.Tensor, text) -> torch.Tensor:
            """The next ids' log-probabilities and the end's: a text that has its length takes the end alone, at
            no cost; the others cannot take it."""
            lp = torch.log_softmax(out.float(), -1)
            finished = torch.tensor([c >= length for c in text.chars], device=lp.device)[:, None]
            return torch.cat([lp.masked_fill(finished, float("-inf")), torch.where(finished, 0.0, float("-inf"))], 1)

        def step(ids, beams: _Beams):
            ids = ids.clamp(max=end - 1)       # a finished beam reads any id: its text is complete
            beams.text.push(ids.tolist())
            out, st = self.stepper.step(ids + offset if offset else ids, beams.state)
            return scored(out, beams.text), _Beams(st, beams.text)

        start = torch.zeros(1, dtype=torch.long, device=self.device)
        beams = _Beams(state, self.text_stream([prompt], length))
        hyps = search(step, start, beams, self.vocab.steps_for(length) + 1, beam_width, eos_id=end,
                      banned=(UNK_ID, *self.vocab.banned), first_log_probs=scored(logits, beams.text))[0]
        texts = []
        for h in hyps:
            text = self.text_stream([prompt], length)
            texts.append(prompt + "".join(text.push([i])[0] for i in h.ids))
        return list(zip(texts, [h.log_prob for h in hyps]))


class RunReader:
    """A charrnn run's :class:`CharLM` and vocabulary as :class:`Sampler` reads them (its
    :class:`charrnn.interfaces.Reader`): prompts through the fused recurrent kernel, then one step of
    :class:`Stepper` per token."""

    def __init__(self, model: CharLM, vocab: Vocab, weights: str = "fp32", backend: str = "auto",
                 labels: Sequence[str] | None = None):
        """``weights`` and ``backend``: see :class:`Stepper`; ``labels``: a labelled run's label names."""
        if model.config.vocab_size != len(vocab):
            raise CharRNNError(f"model has {model.config.vocab_size} ids but the vocabulary {len(vocab)}; "
                               "the run directory is inconsistent, retrain it")
        self.model = model.eval()
        self.vocab = vocab
        self.device = model.head.weight.device
        self.stepper = Stepper(model, weights, backend)
        self.batchable = True     # int8 too: each row's activations are quantised on their own
        self.prompt_cache: PromptCache | None = None     # off unless asked for (the server turns it on)
        self.labels = list(labels or [])
        self.mixes: dict[tuple, tuple[int, torch.Tensor | None]] = {}    # a mix's block and initial state
        if len(self.labels) != model.config.n_labels:
            raise CharRNNError(f"the run names {len(self.labels)} labels but its model reads {model.config.n_labels}; "
                               "the run directory is inconsistent, retrain it")

    def check_label(self, label: str | None) -> np.ndarray:
        """The weight of every label ``label`` asks for (a name, or a mix ``a=0.7,b=0.3``; None: unlabelled)."""
        return requested_weights(label, self.labels)

    def label_offset(self, label: str | None) -> int:
        """What ``label`` adds to the ids the model reads (:mod:`charrnn.labels`): a label's block of the input
        table, or a mix's, made the first time it is asked for (the stepper's table grows by one block)."""
        weights = self.check_label(label)
        if np.count_nonzero(weights) == 1:
            return int(np.argmax(weights)) * self.model.config.vocab_size
        key = tuple(np.round(weights, 6))
        if key not in self.mixes:
            if len(self.mixes) >= MAX_MIXES:
                raise OptionError("label", "asks for a new mix of labels, past the {n} this model keeps; use one "
                                           "of the mixes asked for before, or load the model again", n=MAX_MIXES)
            w = torch.tensor(weights, dtype=torch.float32, device=self.device)
            with torch.no_grad():
                table = self.model.input_projection().float().view(len(weights), self.model.config.vocab_size, -1)
                index = self.stepper.add_block(torch.einsum("l,lvg->vg", w, table))
                initial = self.model.initial_state
                self.mixes[key] = (index, None if initial is None else torch.einsum("l,lskh->skh", w,
                                                                                     initial.float()))
        return self.mixes[key][0] * self.model.config.vocab_size

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, list[str]]:
        """Prompt ids and the characters that are not in the vocabulary (mapped to ``[UNK]``).

        An empty prompt starts from a newline when the vocabulary has one.
        """
        prompt = start_text(prompt, self.vocab.chars)
        ids = torch.from_numpy(self.vocab.encode(prompt).astype("int64"))
        return ids, self.vocab.unknown(prompt)

    def healed(self, prompt: str) -> tuple[torch.Tensor, bytes]:
        """The ids the model reads for ``prompt`` and the bytes its first generated token must start with
        (token healing: a word or BPE prompt may end inside a token; see :meth:`TokenVocab.heal`)."""
        ids, tail = self.vocab.heal(start_text(prompt, self.vocab.chars))
        return torch.from_numpy(ids), tail

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """The ids the model reads for ``prompt`` (what a repetition penalty counts as seen)."""
        return self.healed(prompt)[0]

    @torch.inference_mode()
    def prime(self, prompts: Sequence[str], offset: int = 0) -> tuple[torch.Tensor, list]:
        """Run each prompt through the model (under the label :meth:`label_offset` gave ``offset``); the last
        logits ``(batch, vocab)`` and the state.

        After token healing the logits allow only the ids that start with the prompt's last token."""
        logits, states = [], []
        by_prompt: dict[str, tuple] = {}
        cache = self.prompt_cache if not offset else None       # the cache holds unlabelled prompts
        for p in prompts:
            if p not in by_prompt:
                by_prompt[p] = cache.get(p) if cache is not None else None
                if by_prompt[p] is None:
                    by_prompt[p] = self._read_prompt(p, offset)
                    if cache is not None:
                        cache.put(p, by_prompt[p])
            out, st = by_prompt[p]
            logits.append(out)
            states.append(st)
        if isinstance(states[0], tuple):    # a cell with several state tensors (LSTM's h and c)
            state = tuple(torch.cat(parts, 1) for parts in zip(*states))
        else:
            state = torch.cat(states, 1)
        return torch.cat(logits, 0), self.stepper.from_module_state(state)

    def token_text(self, i: int) -> str:
        """The text of id ``i`` alone (the alternatives of a log-probability record)."""
        return self.vocab.token_bytes[i].decode("utf-8", errors="replace")

    def _read_prompt(self, prompt: str, offset: int = 0) -> tuple[torch.Tensor, State]:
        """The logits after ``prompt`` ``(1, vocab)`` and the model's state; after token healing the logits
        allow only the ids that start with the prompt's last token."""
        ids, tail = self.healed(prompt)
        if offset >= self.model.config.n_labels * self.model.config.vocab_size > 0:
            out, st = self._read_mixed(ids, offset)
        else:
            st = None
            # In pieces, so that a long prompt costs its ids, not a row of activations per character.
            for piece in ids.to(self.device).split(PRIME_CHUNK):
                out, st = self.model(piece[None] + offset, st)
            out = out[:, -1]
        if tail:            # token healing: the first token completes the prompt's last one
            allowed = torch.from_numpy(self.vocab.starting_with(tail)).to(out.device)
            out = out.masked_fill(~allowed, float("-inf"))
        return out, st

    def _read_mixed(self, ids: torch.Tensor, offset: int) -> tuple[torch.Tensor, State]:
        """A prompt read under a mix of labels: one stepper step per id over the mix's block (the model's fused
        kernel knows the labels' blocks only), from the mix of the labels' initial states (or zeros)."""
        initial = next(h0 for index, h0 in self.mixes.values() if index * self.model.config.vocab_size == offset)
        if initial is None:
            state = self.model.zero_state(1)
        else:
            parts = tuple(initial[k][:, None, :].contiguous() for k in range(initial.shape[0]))
            state = parts if len(parts) > 1 else parts[0]
        state = self.stepper.from_module_state(state)
        for i in ids.tolist():
            out, state = self.stepper.step(torch.tensor([i + offset], device=self.device), state)
        return out, self.stepper.to_module_state(state)

    def text_stream(self, prompts: Sequence[str], length: int) -> TextStream:
        """What turns the generated ids of ``prompts`` into their ``length`` characters of text."""
        skip = [len(self.healed(p)[1]) for p in prompts]
        return TextStream(self.vocab.token_bytes, len(prompts), length, skip)

    def check_fits(self, option: str, value: int, rows: int, length: int = 0) -> None:
        """:func:`charrnn.hardware.check_sampling_fits` for this model and device."""
        check_sampling_fits(self.model.config, self.device, option, value, rows, length)


class _Beams:
    """Beam search's state: the model's, and each beam's text so far (to know when it has its length)."""

    def __init__(self, state, text):
        self.state, self.text = state, text

    def select_rows(self, index: torch.Tensor) -> _Beams:
        from .beam import select_state

        return _Beams(select_state(self.state, index), self.text.select_rows(index.tolist()))
