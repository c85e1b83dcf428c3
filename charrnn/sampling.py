"""Generating text: logits processors, a fast one-step cell and the batched streaming sampler.

The prompt goes through the model's fused recurrent kernel in one call; after that
each new character costs one step of :class:`Stepper`, a hand-written GRU / LSTM /
RNN cell over the model's own weights.  Its first layer's input projection is folded
into a ``(vocab, gates * hidden)`` table (embedding @ W_ih + b_ih), so a step is a
row lookup, one matrix-vector product per layer and the output layer, for all
samples of the batch at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native, ops
from .errors import CharRNNError
from .hardware import check_sampling_fits
from .models import minrnn
from .models.charlm import CharLM, State
from .models.minrnn import MIN_ARCHS
from .ops import gru
from .ops.table import input_table
from .options import GREEDY_BELOW, check_beam_width, check_sampling_options, start_text  # noqa: F401
from .decoding import Decoding, Penalties, choose, penalize, process_logits  # noqa: F401 (the sampler's API)
from .tokens import TextStream
from .vocab import UNK_ID, Vocab

# Prompt characters run through the model at once when priming.
PRIME_CHUNK = 1024


WEIGHT_FORMATS = ("fp32", "int8")
BACKENDS = ("auto", "native", "python")

# int8 weights and activations use 63 levels either side of zero (7 bits): the range in which the
# AVX2 kernels of charrnn/native.py can neither saturate nor overflow.  Their products are summed
# exactly in fp32 while every partial sum stays below 2**24.
_LEVELS = 63
_EXACT_FP32_COLUMNS = (1 << 24) // (_LEVELS * _LEVELS)


class _Linear:
    """``x -> x @ W.T + b``, in fp32 or with int8 weights.

    int8: weights in [-63, 63] with one scale per output row (``max |W_row| / 63``); each input
    row (sample) is quantised on the fly to [-63, 63] with its own scale (``max |x_row| / 63``,
    round half to even); the products are summed exactly, then ``acc * (scale_x * scale_w) + b``
    in fp32.  The pure-PyTorch version here sums the integer-valued products in fp32 (exact up
    to 4227 columns, fp64 beyond); the compiled one (:mod:`charrnn.native`) in integers: the
    same numbers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, int8: bool):
        self.int8 = int8
        self.b = bias.detach().float().contiguous()
        w = weight.detach().float()
        if not int8:
            self.w = w.contiguous()
            return
        self.sw = w.abs().amax(1) / _LEVELS
        self.q = torch.round(w / self.sw.clamp_min(1e-30)[:, None]).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
        self._acc_dtype = torch.float32 if w.shape[1] <= _EXACT_FP32_COLUMNS else torch.float64
        self._qf = None

    def native_parts(self) -> list:
        """The weights as charrnn/native.py takes them: fp32 ``[w, b]``, or int8 ``[packed (blocks of 8
        rows, a multiple of 4; column quads, an even number; 8 x 4 bytes), 63 * row sums (int32),
        scales, bias]``."""
        if not self.int8:
            return [self.w, self.b]
        n, k = self.q.shape
        nb, quads = -(-n // 32) * 4, -(-k // 8) * 2
        w = torch.zeros(nb * 8, quads * 4, dtype=torch.int8)
        w[:n, :k] = self.q.cpu()
        packed = w.view(nb, 8, quads, 4).permute(0, 2, 1, 3).contiguous().view(nb, quads, 32)
        comp = _LEVELS * w.sum(1, dtype=torch.int32)
        return [packed, comp, self.sw.cpu().contiguous(), self.b.cpu()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            return torch.addmm(self.b, x, self.w.t())
        if self._qf is None:
            self._qf = self.q.to(self._acc_dtype)
        m = x.abs().amax(1, keepdim=True)
        levels = torch.tensor(float(_LEVELS), device=x.device)
        inv = torch.where(m > 0, levels / m, torch.zeros((), device=x.device))
        xq = torch.round(x * inv)
        acc = torch.mm(xq.to(self._acc_dtype), self._qf.t()).float()
        return acc.mul_((m / levels) * self.sw).add_(self.b)


class Stepper:
    """One character at a time from a :class:`CharLM`'s weights.

    ``step(ids (batch,), state) -> (logits (batch, vocab), state)`` with ``state`` a list of
    per-layer ``(batch, hidden)`` tensors (pairs ``(h, c)`` for LSTM); every call returns new
    tensors (callers may keep old states).

    The first layer's input projection is folded into a ``(vocab, gates * hidden)`` table, so
    a step is a row lookup, one matrix product per layer and the output layer.  On the CPU
    the whole step runs as one call into a small compiled extension (:mod:`charrnn.native`)
    when it can be built; otherwise the same arithmetic runs as PyTorch operations, with
    bit-identical results.  ``backend`` forces one (``"native"`` raises when it is unavailable).
    """

    def __init__(self, model: CharLM, weights: str = "fp32", backend: str = "auto"):
        """``weights="int8"`` runs the matrix products with int8 weights (per-row scales,
        activations quantised per sample): 4x less memory to stream per character."""
        if weights not in WEIGHT_FORMATS:
            raise CharRNNError(f"sampling weights must be one of {', '.join(WEIGHT_FORMATS)}, got '{weights}'")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        c = model.config
        self.arch, self.layers, self.hidden, self.weights = c.arch, c.layers, c.hidden, weights
        rnn = model.rnn
        int8 = weights == "int8"
        with torch.no_grad():
            embedding = model.embedding.weight if model.embedding is not None else None
            self.table = input_table(rnn.weight_ih_l0, rnn.bias_ih_l0, embedding).float().contiguous()
            self.lin_ih = [None] + [_Linear(getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"bias_ih_l{i}"), int8)
                                    for i in range(1, c.layers)]
            self.lin_hh = [] if c.arch in MIN_ARCHS else [
                _Linear(getattr(rnn, f"weight_hh_l{i}"), getattr(rnn, f"bias_hh_l{i}"), int8) for i in range(c.layers)]
            self.head = _Linear(model.head.weight, model.head.bias, int8)
        self._native = None
        if backend != "python":
            self._native = self._build_native()
            if self._native is None and backend == "native":
                off = not ops.backend.current().native
                raise CharRNNError("the compiled sampling step is unavailable: "
                                   + ("it is turned off (CHARRNN_NATIVE=0 or charrnn.ops.use(native=False))" if off
                                      else native.error() or "it needs a CPU model"))
        self.backend = "native" if self._native is not None else "python"

    def _build_native(self):
        if self.table.device.type != "cpu" or self.arch in MIN_ARCHS:     # minGRU / minLSTM: the PyTorch step
            return None
        module = ops.backend.compiled()
        if module is None:
            return None
        arch = {"gru": 0, "lstm": 1, "rnn": 2}[self.arch]
        ih = [[]] + [lin.native_parts() for lin in self.lin_ih[1:]]
        hh = [lin.native_parts() for lin in self.lin_hh]
        return module.Step(arch, self.hidden, self.table, ih, hh, self.head.native_parts(), self.table.shape[0])

    def from_module_state(self, state: State) -> list:
        if self.arch == "lstm":
            h, c = state
            return [(h[i], c[i]) for i in range(self.layers)]
        return [state[i] for i in range(self.layers)]

    def to_module_state(self, state: list) -> State:
        if self.arch == "lstm":
            return torch.stack([h for h, _ in state]), torch.stack([c for _, c in state])
        return torch.stack(state)

    def step(self, ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        if self._native is not None:
            if self.arch == "lstm":
                logits, flat = self._native.step(ids, [t for hc in state for t in hc])
                return logits, list(zip(flat[::2], flat[1::2]))
            logits, new_state = self._native.step(ids, list(state))
            return logits, new_state
        return self._python_step(ids, state)

    def _python_step(self, ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """The step in PyTorch operations; charrnn/native.py does exactly these, in this order.

        ``tanh(a)`` is ``2 * sigmoid(2a) - 1`` (doubling is exact), the form the compiled step
        uses because ATen's sigmoid costs a quarter of its tanh."""
        H = self.hidden
        new_state = []
        x = None
        for i in range(self.layers):
            gi = F.embedding(ids, self.table) if i == 0 else self.lin_ih[i](x)
            if self.arch in MIN_ARCHS:
                h = minrnn.step(self.arch, gi, state[i])
                new_state.append(h)
            elif self.arch == "gru":
                h = state[i].contiguous()
                rz, n, h_out = h.new_empty(h.shape[0], 2 * H), torch.empty_like(h), torch.empty_like(h)
                h = gru.cell(gi, self.lin_hh[i](h), h, n, h_out, rz, _tanh_)
                new_state.append(h)
            elif self.arch == "lstm":
                h, c = (t.contiguous() for t in state[i])
                g = torch.add(gi, self.lin_hh[i](h))                 # [i, f, g, o]
                g[:, 2 * H:3 * H].mul_(2)
                g.sigmoid_()
                g[:, 2 * H:3 * H].mul_(2).sub_(1)
                c = torch.mul(g[:, H:2 * H], c).add_(torch.mul(g[:, :H], g[:, 2 * H:3 * H]))
                h = torch.mul(g[:, 3 * H:], _tanh_(c.clone()))
                new_state.append((h, c))
            else:
                h = _tanh_(torch.add(gi, self.lin_hh[i](state[i].contiguous())))
                new_state.append(h)
            x = h
        return self.head(x), new_state


def _tanh_(a: torch.Tensor) -> torch.Tensor:
    """``tanh(a)`` in place, as ``2 * sigmoid(2a) - 1``."""
    return a.mul_(2).sigmoid_().mul_(2).sub_(1)


class PromptCache:
    """The model's state after recent prompts, least recently used dropped first past ``max_bytes``: a
    recurrent model's whole context is one small state, so a repeated prompt costs a copy, not a read.
    Entries are never changed after they are stored (priming concatenates them into new tensors)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[str, tuple] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def size(entry: tuple) -> int:
        out, st = entry
        return sum(t.numel() * t.element_size() for t in (out, *(st if isinstance(st, tuple) else (st,))))

    def get(self, prompt: str) -> tuple | None:
        entry = self.entries.get(prompt)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(prompt)
        return entry

    def put(self, prompt: str, entry: tuple) -> None:
        size = self.size(entry) + len(prompt) * 4
        if size > self.max_bytes or prompt in self.entries:
            return
        self.entries[prompt] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, dropped = self.entries.popitem(last=False)
            self.bytes -= self.size(dropped) + len(old) * 4


@dataclass
class Completion:
    """A generated text (prompt + continuation), why it ended (``"stop"``: a stop text, ``"length"``) and,
    when asked, one log-probability record per generated id."""

    text: str
    finish_reason: str
    logprobs: list[dict]


class Sampler:
    """Batched, streaming text generation from a :class:`CharLM` and its vocabulary."""

    batchable = True    # the server may step several requests as one batch (see charrnn.serve.engine)

    def __init__(self, model: CharLM, vocab: Vocab, weights: str = "fp32", backend: str = "auto"):
        """``weights`` and ``backend``: see :class:`Stepper`."""
        if model.config.vocab_size != len(vocab):
            raise CharRNNError(f"model has {model.config.vocab_size} ids but the vocabulary {len(vocab)}; "
                               "the run directory is inconsistent, retrain it")
        self.model = model.eval()
        self.vocab = vocab
        self.device = model.head.weight.device
        self.stepper = Stepper(model, weights, backend)
        self.batchable = weights == "fp32"    # int8 quantises activations per batch: one request at a time
        self.prompt_cache: PromptCache | None = None     # off unless asked for (the server turns it on)

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
    def prime(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list]:
        """Run each prompt through the model; the last logits ``(batch, vocab)`` and the state.

        After token healing the logits allow only the ids that start with the prompt's last token."""
        logits, states = [], []
        by_prompt: dict[str, tuple] = {}
        for p in prompts:
            if p not in by_prompt:
                by_prompt[p] = self.prompt_cache.get(p) if self.prompt_cache is not None else None
                if by_prompt[p] is None:
                    by_prompt[p] = self._read_prompt(p)
                    if self.prompt_cache is not None:
                        self.prompt_cache.put(p, by_prompt[p])
            out, st = by_prompt[p]
            logits.append(out)
            states.append(st)
        if self.model.config.arch == "lstm":
            state = (torch.cat([s[0] for s in states], 1), torch.cat([s[1] for s in states], 1))
        else:
            state = torch.cat(states, 1)
        return torch.cat(logits, 0), self.stepper.from_module_state(state)

    def token_text(self, i: int) -> str:
        """The text of id ``i`` alone (the alternatives of a log-probability record)."""
        return self.vocab.token_bytes[i].decode("utf-8", errors="replace")

    @torch.inference_mode()
    def steps(self, prompts: Sequence[str], decoding: Decoding) -> Iterator[torch.Tensor]:
        """Yield the ids ``(batch,)`` that ``decoding`` chooses, one batched step each, until its steps are spent."""
        self.check_fits("num_samples", len(prompts), len(prompts))
        if decoding.steps_left <= 0:
            return
        logits, state = self.prime(prompts)
        while True:
            ids = decoding.choose(logits)
            yield ids
            if decoding.steps_left <= 0:
                return
            logits, state = self.stepper.step(ids, state)

    def stream_ids(self, prompts: Sequence[str], length: int, **options) -> Iterator[torch.Tensor]:
        """Yield the next ids ``(batch,)`` ``length`` times, one batched step each (``options``: see
        :class:`charrnn.decoding.Decoding`)."""
        return self.steps(prompts, Decoding(self, prompts, length, steps=length, **options))

    def _read_prompt(self, prompt: str) -> tuple[torch.Tensor, State]:
        """The logits after ``prompt`` ``(1, vocab)`` and the model's state; after token healing the logits
        allow only the ids that start with the prompt's last token."""
        ids, tail = self.healed(prompt)
        st = None
        # In pieces, so that a long prompt costs its ids, not a row of activations per character.
        for piece in ids.to(self.device).split(PRIME_CHUNK):
            out, st = self.model(piece[None], st)
        out = out[:, -1]
        if tail:            # token healing: the first token completes the prompt's last one
            allowed = torch.from_numpy(self.vocab.starting_with(tail)).to(out.device)
            out = out.masked_fill(~allowed, float("-inf"))
        return out, st

    def text_stream(self, prompts: Sequence[str], length: int) -> TextStream:
        """What turns the generated ids of ``prompts`` into their ``length`` characters of text."""
        skip = [len(self.healed(p)[1]) for p in prompts]
        return TextStream(self.vocab.token_bytes, len(prompts), length, skip)

    def decode(self, prompts: Sequence[str], decoding: Decoding) -> Iterator[tuple[list[str], list[list[dict]]]]:
        """Yield every sample's new text (and log-probability records), one step at a time, until every sample
        has finished (``decoding.finish`` says how)."""
        steps = self.steps(prompts, decoding)
        for ids in steps:
            yield decoding.read([ids.tolist()])
            if decoding.done:
                steps.close()
                return

    def stream(self, prompts: Sequence[str], length: int, **options) -> Iterator[list[str]]:
        """Yield the new text of every sample, one step (one id each) at a time, until each has ``length``
        characters (one character per step for a character model) or met a ``stop`` text."""
        for texts, _ in self.decode(prompts, Decoding(self, prompts, length, **options)):
            yield texts

    def check_fits(self, option: str, value: int, rows: int, length: int = 0) -> None:
        """:func:`charrnn.hardware.check_sampling_fits` for this model and device."""
        check_sampling_fits(self.model.config, self.device, option, value, rows, length)

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[str] = "\n", length: int = 1000, num_samples: int = 1,
                 interrupted: Callable[[], bool] | None = None, **options) -> list[str]:
        """Complete texts (prompt + continuation), one per sample; shorter when ``interrupted()`` turns true
        (asked after each step).  ``options``: see :class:`charrnn.decoding.Decoding`."""
        if self.vocab.kind != "char" or options.get("stop") or options.get("logprobs") is not None:
            return [c.text for c in self.complete(prompt, length, num_samples, interrupted, **options)]
        prompts, decoding = self._checked(prompt, length, num_samples, options)
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
                 interrupted: Callable[[], bool] | None = None, **options) -> list[Completion]:
        """One :class:`Completion` per sample: its text, why it ended and its log-probability records."""
        prompts, decoding = self._checked(prompt, length, num_samples, options)
        texts, records = list(prompts), [[] for _ in prompts]
        for new, recs in self.decode(prompts, decoding):
            texts = [t + n for t, n in zip(texts, new)]
            records = [a + b for a, b in zip(records, recs)]
            if interrupted is not None and interrupted():
                break
        return [Completion(t, f or "length", r) for t, f, r in zip(texts, decoding.finish, records)]

    def _checked(self, prompt: str | Sequence[str], length: int, num_samples: int,
                 options: dict) -> tuple[list[str], Decoding]:
        """The prompts of a batch and their decoding, once the options are checked and the batch is known to
        fit in memory (before anything of its size is made)."""
        rows = num_samples if isinstance(prompt, str) else len(prompt)
        sampling = {k: v for k, v in options.items() if k not in ("stop", "logprobs", "steps")}
        check_sampling_options(length=length, num_samples=rows, **sampling)
        self.check_fits("num_samples", rows, rows)
        self.check_fits("length", length, rows, length)
        prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
        return prompts, Decoding(self, prompts, length, **options)

    @torch.inference_mode()
    def beam(self, prompt: str, length: int, beam_width: int) -> list[tuple[str, float]]:
        """The ``beam_width`` most likely continuations of ``prompt`` (``length`` characters each, ``[UNK]``
        excluded), as ``(prompt + continuation, total log-probability of the continuation)``, best first.

        Beam search from :mod:`charrnn.beam` over :class:`Stepper` (all beams in one batched step); a beam
        ends once its text has ``length`` characters (its last token may reach past them, and is cut).
        """
        from .beam import search

        check_sampling_options(length=length)
        check_beam_width(beam_width)
        self.check_fits("beam_width", beam_width, int(beam_width) * self.model.config.vocab_size)
        if length == 0:
            return [(prompt, 0.0)]
        logits, state = self.prime([prompt])
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
            out, st = self.stepper.step(ids, beams.state)
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


class _Beams:
    """Beam search's state: the model's, and each beam's text so far (to know when it has its length)."""

    def __init__(self, state, text):
        self.state, self.text = state, text

    def select_rows(self, index: torch.Tensor) -> _Beams:
        from .beam import select_state

        return _Beams(select_state(self.state, index), self.text.select_rows(index.tolist()))
