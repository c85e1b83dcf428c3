"""The model's state after recent prompts (the server's prompt cache)."""

from __future__ import annotations

from collections import OrderedDict


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
