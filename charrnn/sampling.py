"""Generating text: logits processors, a fast one-step cell and the batched streaming sampler.

The prompt goes through the model's fused recurrent kernel in one call; after that
each new character costs one step of :class:`Stepper`, a hand-written GRU / LSTM /
RNN cell over the model's own weights.  Its first layer's input projection is folded
into a ``(vocab, gates * hidden)`` table (embedding @ W_ih + b_ih), so a step is a
row lookup, one matrix-vector product per layer and the output layer, for all
samples of the batch at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import CharRNNError
from .models.charlm import CharLM, State
from .options import check_beam_width, check_sampling_options, start_text  # noqa: F401 (re-exported)
from .vocab import UNK_ID, Vocab


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Scaled, filtered logits ``(batch, vocab)``; filtered-out entries are ``-inf``.

    ``[UNK]`` is always removed.  ``temperature`` must be > 0 here (0 is handled as greedy
    by the caller).  ``top_k`` keeps the k largest; ``top_p`` keeps the smallest set of
    most likely characters whose probability reaches p (always at least one).
    """
    logits = logits.float() / temperature
    logits[:, UNK_ID] = float("-inf")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a character when the mass of the ones strictly more likely already reaches p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(logits: torch.Tensor, temperature: float, top_k, top_p, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids ``(batch,)`` from logits ``(batch, vocab)``: greedy at temperature 0, else sampled."""
    if temperature == 0:
        masked = logits.float().clone()
        masked[:, UNK_ID] = float("-inf")
        return masked.argmax(-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
    # Inverse-CDF sampling: three small ops, a fraction of torch.multinomial's per-call cost.
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


WEIGHT_FORMATS = ("fp32", "int8")


def _fp32_linear(weight: torch.Tensor, bias: torch.Tensor):
    weight, bias = weight.detach(), bias.detach()
    return lambda x: F.linear(x, weight, bias)


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor):
    """``x -> x @ W.T + b`` with W quantised to int8 per output row (CPU only)."""
    w = weight.detach().float().cpu()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    q = torch.quantize_per_channel(w, scales, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(q, bias.detach().float().cpu())
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed)


class Stepper:
    """One character at a time from a :class:`CharLM`'s weights (no copy of the recurrent weights).

    ``step(ids (batch,), state) -> (logits (batch, vocab), state)`` with ``state`` a list of
    per-layer ``(batch, hidden)`` tensors (pairs ``(h, c)`` for LSTM).
    """

    def __init__(self, model: CharLM, weights: str = "fp32"):
        """``weights="int8"`` runs the matrix products with int8 weights (per-row scales, dynamic
        activation quantisation, fbgemm): 4x less memory to stream per character."""
        if weights not in WEIGHT_FORMATS:
            raise CharRNNError(f"sampling weights must be one of {', '.join(WEIGHT_FORMATS)}, got '{weights}'")
        c = model.config
        self.arch, self.layers, self.hidden = c.arch, c.layers, c.hidden
        rnn = model.rnn
        with torch.no_grad():
            w0, b0 = rnn.weight_ih_l0, rnn.bias_ih_l0
            inputs = model.embedding.weight if model.embedding is not None else torch.eye(c.vocab_size, device=w0.device)
            self.table = torch.addmm(b0, inputs, w0.t()).contiguous()  # (vocab, gates*hidden)
        linear = _int8_linear if weights == "int8" else _fp32_linear
        self.lin_ih = [None] + [linear(getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"bias_ih_l{i}"))
                                for i in range(1, c.layers)]
        self.lin_hh = [linear(getattr(rnn, f"weight_hh_l{i}"), getattr(rnn, f"bias_hh_l{i}")) for i in range(c.layers)]
        self.head = linear(model.head.weight, model.head.bias)

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
        H = self.hidden
        new_state = []
        x = None
        for i in range(self.layers):
            gi = F.embedding(ids, self.table) if i == 0 else self.lin_ih[i](x)
            if self.arch == "gru":
                h = state[i]
                gh = self.lin_hh[i](h)
                rz = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])
                r, z = rz[:, :H], rz[:, H:]
                n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
                h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
                new_state.append(h)
            elif self.arch == "lstm":
                h, c = state[i]
                gates = gi + self.lin_hh[i](h)
                ig, fg, gg, og = gates.chunk(4, dim=1)
                c = torch.sigmoid(fg) * c + torch.sigmoid(ig) * torch.tanh(gg)
                h = torch.sigmoid(og) * torch.tanh(c)
                new_state.append((h, c))
            else:
                h = torch.tanh(gi + self.lin_hh[i](state[i]))
                new_state.append(h)
            x = h
        return self.head(x), new_state


class Sampler:
    """Batched, streaming text generation from a :class:`CharLM` and its vocabulary."""

    def __init__(self, model: CharLM, vocab: Vocab, weights: str = "fp32"):
        if model.config.vocab_size != len(vocab):
            raise CharRNNError(f"model has {model.config.vocab_size} ids but the vocabulary {len(vocab)}; "
                               "the run directory is inconsistent, retrain it")
        self.model = model.eval()
        self.vocab = vocab
        self.device = model.head.weight.device
        self.stepper = Stepper(model, weights)

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, list[str]]:
        """Prompt ids and the characters that are not in the vocabulary (mapped to ``[UNK]``).

        An empty prompt starts from a newline when the vocabulary has one.
        """
        prompt = start_text(prompt, self.vocab.chars)
        ids = torch.from_numpy(self.vocab.encode(prompt).astype("int64"))
        return ids, self.vocab.unknown_chars(prompt)

    @torch.inference_mode()
    def prime(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list]:
        """Run each prompt through the model; the last logits ``(batch, vocab)`` and the state."""
        logits, states = [], []
        by_prompt: dict[str, tuple] = {}
        for p in prompts:
            if p not in by_prompt:
                ids, _ = self.encode_prompt(p)
                out, st = self.model(ids.to(self.device)[None])
                by_prompt[p] = (out[:, -1], st)
            out, st = by_prompt[p]
            logits.append(out)
            states.append(st)
        if self.model.config.arch == "lstm":
            state = (torch.cat([s[0] for s in states], 1), torch.cat([s[1] for s in states], 1))
        else:
            state = torch.cat(states, 1)
        return torch.cat(logits, 0), self.stepper.from_module_state(state)

    @torch.inference_mode()
    def stream_ids(self, prompts: Sequence[str], length: int, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next ids ``(batch,)`` ``length`` times, one batched step each."""
        check_sampling_options(temperature, top_k, top_p, length, len(prompts) or 1)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        if length == 0:
            return
        logits, state = self.prime(prompts)
        for i in range(length):
            ids = choose(logits, temperature, top_k, top_p, generator)
            yield ids
            if i + 1 < length:
                logits, state = self.stepper.step(ids, state)

    def stream(self, prompts: Sequence[str], length: int, **options) -> Iterator[list[str]]:
        """Yield, ``length`` times, the next character of every sample."""
        chars = self.vocab.chars
        for ids in self.stream_ids(prompts, length, **options):
            yield [chars[i - 1] for i in ids.tolist()]

    def generate(self, prompt: str | Sequence[str] = "\n", length: int = 1000, num_samples: int = 1,
                 **options) -> list[str]:
        """Complete texts (prompt + continuation), one per sample."""
        prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
        opts = {k: v for k, v in options.items() if k in ("temperature", "top_k", "top_p")}
        check_sampling_options(length=length, num_samples=len(prompts), **opts)
        pieces: list[list[str]] = [[p] for p in prompts]
        for step in self.stream(prompts, length, **options):
            for piece, ch in zip(pieces, step):
                piece.append(ch)
        return ["".join(p) for p in pieces]

    @torch.inference_mode()
    def beam(self, prompt: str, length: int, beam_width: int) -> list[tuple[str, float]]:
        """The ``beam_width`` most likely continuations of ``prompt`` (``length`` characters each, ``[UNK]``
        excluded), as ``(prompt + continuation, total log-probability of the continuation)``, best first.

        Beam search from :mod:`charrnn.beam` over :class:`Stepper` (all beams in one batched step).
        """
        from .beam import search

        check_sampling_options(length=length)
        check_beam_width(beam_width)
        if length == 0:
            return [(prompt, 0.0)]
        logits, state = self.prime([prompt])

        def step(ids, st):
            out, st = self.stepper.step(ids, st)
            return torch.log_softmax(out.float(), -1), st

        first = torch.log_softmax(logits.float(), -1)
        start = torch.zeros(1, dtype=torch.long, device=self.device)
        hyps = search(step, start, state, length, beam_width, banned=(UNK_ID,), first_log_probs=first)[0]
        return [(prompt + self.vocab.decode(h.ids), h.log_prob) for h in hyps]
