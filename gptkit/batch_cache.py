"""The KV cache of a running batch whose rows have different lengths (`gptkit.generate`'s engine).

`BatchCache` keeps the rows right-aligned in one `KVCache`, with empty, masked slots to the left of
the shorter ones; `left_pad_inputs` gives the position ids and key mask of such a layout;
`row_view` is one row of it as a cache of its own (a view), for the engine's batch-invariant mode.

Shapes: B rows, T time.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gptkit.config import GPTConfig
from gptkit.model import KVCache


def left_pad_inputs(pad: Sequence[int], start: int, end: int,
                    device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Position ids and key mask for left-padded rows, row i having pad[i] empty slots first.

    The queries sit in slots start..end-1 and attend to slots 0..end-1. Returns positions
    (B, end - start), where slot s of row i is position s - pad[i], and key_mask (B, end), False
    on empty slots; (None, None) when no row is padded (the model's default positions)."""
    if not any(pad):
        return None, None
    p = torch.tensor(pad, device=device)[:, None]  # (B, 1)
    slots = torch.arange(end, device=device)[None, :]  # (1, end)
    return (slots[:, start:] - p).clamp_(min=0), slots >= p


class BatchCache:
    """The KV cache of the running rows, right-aligned: every row's last key sits just left of the
    shared write position `kv.pos`, with `pad[i]` empty slots to its left (masked out by the key
    mask; row i's token in slot s has position s - pad[i]). Rows that join are prefilled into a
    cache of their own and copied in at the right end (`admit`); if their prompts are longer than
    the running rows, the cache grows to the left. Empty slots that every row has are dropped
    (`keep`), so `kv.pos` is the longest row's length, never more than the context. Rows are
    known by their place in the cache only; `need[i]` is the number of tokens row i holds at most
    (prompt + max new tokens), which sizes the cache.
    """

    def __init__(self, config: GPTConfig, device, dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.kv: KVCache | None = None
        self.pad: list[int] = []  # empty slots left of each row
        self.need: list[int] = []  # the most tokens each row will hold

    def __len__(self) -> int:
        return len(self.pad)

    def _new(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)

    def _capacity(self, pad: list[int], need: list[int], at_least: int) -> int:
        """Slots for these rows to run to the end (or to the context), and at least `at_least`."""
        most = max(p + n for p, n in zip(pad, need))
        return max(at_least, min(most, self.config.block_size))

    def keep(self, index: list[int]) -> None:
        """Keep rows `index` (increasing) only, then drop the empty slots every row has on its left."""
        if not index:
            self.kv, self.pad, self.need = None, [], []
            return
        kv = self.kv
        if len(index) < len(self.pad):
            kv.reorder(torch.tensor(index, device=self.device))
            self.pad = [self.pad[i] for i in index]
            self.need = [self.need[i] for i in index]
        d = min(self.pad)
        if d:  # a view, not a copy
            kv.k, kv.v = kv.k[:, :, :, d:], kv.v[:, :, :, d:]
            kv.pos -= d
            kv.max_len -= d
            self.pad = [p - d for p in self.pad]

    def decode_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Make room for one more token per row (out of room after joins or trims: grow to the
        right) and return its positions (B, 1) and key mask (B, pos + 1), as `left_pad_inputs`."""
        kv = self.kv
        if kv.pos + 1 > kv.max_len:
            grown = self._new(len(self), self._capacity(self.pad, self.need, kv.pos + 1))
            grown.k[:, :, :, :kv.pos] = kv.k[:, :, :, :kv.pos]
            grown.v[:, :, :, :kv.pos] = kv.v[:, :, :, :kv.pos]
            grown.pos = kv.pos
            self.kv = kv = grown
        return left_pad_inputs(self.pad, kv.pos, kv.pos + 1, self.device)

    def prefill_cache(self, pad: list[int], need: list[int], T: int) -> KVCache:
        """An empty cache for newcomers' prompts left-padded to T: alone, it becomes the running
        cache, sized to run on; joining running rows, it only needs the prompts."""
        if self.kv is None:
            return self._new(len(pad), self._capacity(pad, need, T))
        return self._new(len(pad), T)

    def admit(self, kv: KVCache, pad: list[int], need: list[int]) -> None:
        """Append the newcomers of `kv` (filled by their prefill) after the running rows,
        right-aligning both groups at the new write position; slots left of a row stay empty."""
        if self.kv is None:
            self.kv, self.pad, self.need = kv, list(pad), list(need)
            return
        old, P, T = self.kv, self.kv.pos, kv.pos
        pos = max(P, T)
        all_pad = [p + pos - P for p in self.pad] + [p + pos - T for p in pad]
        all_need = self.need + list(need)
        merged = self._new(len(all_pad), self._capacity(all_pad, all_need, pos))
        B = len(self)
        merged.k[:, :B, :, pos - P:pos] = old.k[:, :, :, :P]
        merged.v[:, :B, :, pos - P:pos] = old.v[:, :, :, :P]
        merged.k[:, B:, :, pos - T:pos] = kv.k[:, :, :, :T]
        merged.v[:, B:, :, pos - T:pos] = kv.v[:, :, :, :T]
        merged.pos = pos
        self.kv, self.pad, self.need = merged, all_pad, all_need


def row_view(kv: KVCache, i: int, start: int, pos: int) -> KVCache:
    """Row i of `kv` from slot `start` on, as a cache of one row whose write position is `pos` (a
    view: what the model writes lands in `kv`)."""
    view = KVCache.__new__(KVCache)
    view.k, view.v = kv.k[:, i:i + 1, :, start:], kv.v[:, i:i + 1, :, start:]
    view.pos, view.max_len = pos, kv.max_len - start
    return view
