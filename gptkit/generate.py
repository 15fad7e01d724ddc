"""The generation engine: batches of prompts with their own settings, stop conditions, streaming
text, and beam search.

- `SamplingParams` holds one request's settings (greedy when temperature is 0, top-k, top-p,
  repetition penalty, stop strings and token ids, max new tokens, seed).
- `Generation` runs several requests in one batch. Prompts of unequal length are left-padded and
  run in one forward pass: padding keys are masked out and every row gets its own position ids, so
  a row generates what it would generate alone. Each `step()` feeds one token per row through the
  KV cache and returns `Event`s: the new token, the text it completes, and whether the row finished.
  Finished or cancelled rows leave the batch, so the others go on at the smaller batch's speed.
- Continuous batching: `Generation.add` queues a request while the batch runs. At the next step it
  is prefilled (with the other newcomers) and its keys and values are copied into the running
  cache, right-aligned with the other rows, so it generates what it would generate alone.
  A row that outgrows the context leaves the cache and is recomputed over its last block_size
  tokens, on its own, while the others go on through the cache.
- Text comes out through `TextStream`: incremental UTF-8 decoding (a multi-byte character is
  never split across pieces) plus stop strings matched on the decoded text, so a stop string may
  span tokens. Text that could still be the start of a stop string is held back until it can't.
- A seeded row draws its uniform numbers from its own generator, so its sample does not depend on
  which other requests share the batch.
- `beam_search` follows transformers' beam search (the same candidates, finished-hypothesis
  bookkeeping, length penalty and early-stopping rules), so both return the same beams.
- A prompt longer than the context is an error, or is cut to its last tokens with a warning
  (`truncate=True`). Past the context, generation goes on with nanoGPT's sliding window: each step
  recomputes the last block_size tokens.

Shapes: B rows, T time, V vocab.
"""

from __future__ import annotations

import codecs
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache
from gptkit.sample import candidate_probs, repetition_penalty, sample_from_logits


@dataclass
class SamplingParams:
    """One request's settings. temperature 0 = greedy; top_k None/0 and top_p None/1 = off."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()  # stop strings, matched on the decoded text; not returned
    stop_token_ids: Sequence[int] = ()  # besides the tokenizer's <|endoftext|>
    ignore_eot: bool = False  # keep going past <|endoftext|> (benchmarks)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    def validate(self, option_names: dict[str, str] | None = None) -> "SamplingParams":
        """Raise GptkitError naming the bad field (or its CLI option, through option_names)."""
        name = lambda f: (option_names or {}).get(f, f)  # noqa: E731
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise GptkitError(f"must be an integer >= 0, got {self.max_new_tokens!r}", name("max_new_tokens"),
                              "give a whole number of tokens")
        if not self.temperature >= 0:
            raise GptkitError(f"must be >= 0, got {self.temperature}", name("temperature"), "0 means greedy")
        if self.top_k is not None and self.top_k < 0:
            raise GptkitError(f"must be > 0, got {self.top_k}", name("top_k"), "give a positive top-k, or leave it out")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptkitError(f"must be in (0, 1], got {self.top_p}", name("top_p"),
                              "give a probability mass such as 0.95, or 1 to turn it off")
        if not self.repetition_penalty > 0:
            raise GptkitError(f"must be > 0, got {self.repetition_penalty}", name("repetition_penalty"),
                              "1.0 means no penalty")
        return self


@dataclass
class Event:
    """What one step produced for one request."""

    index: int  # the request's position in the list given to Generation
    token: int | None  # the new token id (None when a cancelled row is reported)
    text: str  # newly completed text; may be "" while a character or a possible stop string is pending
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOT, stop token or string, cancel) | "length"


@dataclass
class Completion:
    """A finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    score: float | None = None  # beam search: the length-penalised log-probability


def token_bytes_fn(tokenizer):
    """id -> the bytes of that token, for either tokenizer kind."""
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes
    cache: dict[int, bytes] = {}

    def tb(i: int) -> bytes:
        b = cache.get(i)
        if b is None:
            b = cache[i] = tokenizer.decode([i]).encode("utf-8")
        return b
    return tb


class TextStream:
    """Turns token bytes into text pieces that never split a UTF-8 character, and finds stop
    strings in the decoded text, including ones that span several tokens."""

    def __init__(self, stops: Sequence[str] = ()):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # all complete characters so far
        self.sent = 0  # how much of self.text was handed out
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to hand out."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(data)
        if not self.stops:
            return self._emit(len(self.text))
        # every stop occurrence starts at or after `sent`: text before it was released only when
        # no stop string could begin there
        hits = [p for p in (self.text.find(s, self.sent) for s in self.stops) if p >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self.text = self.text[:end]
            return self._emit(end)
        return self._emit(len(self.text) - self._pending_prefix())

    def finish(self) -> str:
        """End of generation: release what was held back (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _pending_prefix(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
        tail = self.text[self.sent:]
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


def prepare_prompt(ids: Sequence[int], block_size: int, truncate: bool = False, where: str = "prompt") -> list[int]:
    """Check a prompt against the context: longer than block_size - 1 tokens is an error, or with
    truncate=True it keeps the last block_size - 1 tokens and warns."""
    ids = list(ids)
    limit = block_size - 1  # room for at least one new token inside the context
    if len(ids) > limit:
        if not truncate:
            raise GptkitError(f"prompt has {len(ids)} tokens, the model's context is {block_size}", where,
                              f"shorten it to at most {limit} tokens"
                              + (", or pass --truncate to keep its end" if where == "--prompt" else ""))
        warnings.warn(f"prompt has {len(ids)} tokens, more than the context allows; "
                      f"keeping its last {limit} tokens", stacklevel=2)
        ids = ids[-limit:]
    if not ids:
        raise GptkitError("prompt is empty", where, "give at least one token (e.g. <|endoftext|>)")
    return ids


def sample_unfiltered(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Temperature sampling with no top-k or top-p: token ids (B,) drawn from softmax(logits (B, V) /
    temperature (B,)) by inverse CDF over the vocabulary in id order, with the uniform numbers u (B,).
    The same distribution as `sample_from_logits` with the filters off, without sorting V logits."""
    cdf = torch.softmax(logits.float() / temperature.float()[:, None], dim=-1).cumsum(dim=-1)  # (B, V)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.size(1) - 1).squeeze(1)  # first cdf > target


class _Row:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, eot: int | None, tb):
        self.index = index
        self.prompt = prompt
        self.params = params
        self.tokens: list[int] = []
        self.stream = TextStream(params.stop) if tb is not None else None
        self.tb = tb
        self.stop_ids = set(params.stop_token_ids)
        if eot is not None and not params.ignore_eot:
            self.stop_ids.add(eot)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator()  # on the CPU: one uniform number per step
            self.generator.manual_seed(int(params.seed))
        self.finished = False
        self.finish_reason: str | None = None


class Generation:
    """A batch of requests generated together, one token per row per `step()`; requests may join
    while it runs (`add`), and finished ones leave it.

    prompts: token id lists (already checked with `prepare_prompt`); params: one SamplingParams
    for all or one per prompt; tokenizer (optional) turns tokens into text and enables stop
    strings; eot: the end-of-text id (default: the tokenizer's); generator: the random stream of
    rows without a seed (default: torch's global RNG). Prompts may be empty: `add` them later.

    The KV cache holds the running rows right-aligned: every row's last key sits just left of the
    shared write position `cache.pos`, with `pad[i]` empty slots to its left (masked out by the
    key mask; row i's token in slot s has position s - pad[i]). A request that joins is prefilled
    on its own (with the other newcomers of that step) and its keys are copied in at the right
    end; if its prompt is longer than the running rows, the cache grows to the left. Empty slots
    that every row has are dropped, so `cache.pos` is the longest row's length, never more than
    the context.
    """

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]] = (),
                 params: SamplingParams | Sequence[SamplingParams] = (), tokenizer=None, eot: int | None = None,
                 generator: torch.Generator | None = None):
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        self.model = model
        self.config = model.config
        self.device = model.transformer.wte.weight.device
        self.dtype = model.transformer.wte.weight.dtype
        self.tokenizer = tokenizer
        self.generator = generator  # for rows without a seed (default: torch's global RNG)
        if eot is None and tokenizer is not None:
            eot = tokenizer.eot
        self.eot = eot
        self.tb = token_bytes_fn(tokenizer) if tokenizer is not None else None
        self.rows: dict[int, _Row] = {}  # index -> row, until `release(index)`
        self.next_index = 0
        self.active: list[_Row] = []  # rows whose keys/values are in self.cache, in cache order
        self.pad: list[int] = []  # empty cache slots left of each active row
        self.cache: KVCache | None = None
        self.windowed: list[_Row] = []  # rows past the context: their last block_size tokens, recomputed
        self.joining: list[_Row] = []  # added, prefilled at the next step
        self.pending: list[Event] = []
        self.forward_sizes: list[int] = []  # rows in each forward pass of the last step
        self._batch: list[_Row] | None = None  # the rows the sampling tensors were built for
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self.add(p, sp, where=f"prompt {i}")

    # ------------------------------------------------------------------------------------------
    def add(self, prompt: Sequence[int], params: SamplingParams, where: str | None = None) -> int:
        """Queue one more request; it is prefilled and joins the running batch at the next `step()`.
        Its tokens are the ones it would get generated alone. Returns its index (for events,
        `cancel`, `release`)."""
        index = self.next_index
        r = _Row(index, list(prompt), params, self.eot, self.tb)
        where = where or f"prompt {index}"
        if not r.prompt:
            raise GptkitError("prompt is empty", where, "give at least one token")
        if len(r.prompt) >= self.config.block_size:
            raise GptkitError(f"prompt has {len(r.prompt)} tokens, the model's context is {self.config.block_size}",
                              where, "shorten it or truncate it with prepare_prompt")
        self.next_index += 1
        self.rows[index] = r
        if params.max_new_tokens == 0:  # nothing to generate
            r.finished, r.finish_reason = True, "length"
            self.pending.append(Event(index, None, "", True, "length"))
        else:
            self.joining.append(r)
        return index

    @property
    def done(self) -> bool:
        """No request is left to run (events may still be pending)."""
        return all(r.finished for r in (*self.active, *self.windowed, *self.joining))

    @property
    def running(self) -> int:
        """Unfinished requests, running or about to join."""
        return sum(not r.finished for r in (*self.active, *self.windowed, *self.joining))

    def cancel(self, index: int) -> None:
        """Stop request `index` (e.g. its client went away); it leaves the batch at the next step."""
        r = self.rows.get(index)
        if r is not None and not r.finished:
            r.finished, r.finish_reason = True, "stop"
            self.pending.append(Event(index, None, "", True, "stop"))

    def release(self, index: int) -> None:
        """Forget a finished request (a long-running server releases each one once it has its last event)."""
        r = self.rows.get(index)
        if r is not None and not r.finished:
            raise ValueError(f"request {index} is still running")
        self.rows.pop(index, None)

    def __iter__(self) -> Iterator[Event]:
        while not self.done or self.pending:
            yield from self.step()

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Run one token for every unfinished row: a decode pass over the cached rows, a recompute
        pass over rows past the context, and a prefill pass over rows that join now."""
        events, self.pending = self.pending, []
        self.forward_sizes = []
        self.joining = [r for r in self.joining if not r.finished]
        self.windowed = [r for r in self.windowed if not r.finished]
        self._compact()
        joining, self.joining = self.joining, []
        if not (self.active or self.windowed or joining):
            return events
        self.screen_k = self._screen_k([*self.active, *self.windowed, *joining])
        parts = []
        if self.active:
            parts.append(self._decode())
        if joining:
            parts.append(self._prefill(joining))  # the new rows join self.active at its end
        if self.windowed:
            parts.append(self._recompute())
        rows = self.active + self.windowed
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        tokens = self._choose(rows, logits)  # (B,) on the CPU
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):
            events.append(self._accept(i, r, t))
        return events

    # ------------------------------------------------------------------------------------------
    def _compact(self) -> None:
        """Drop finished rows from the cache, move rows that outgrew the context to the recompute
        group, and drop the empty slots every remaining row has on its left."""
        bs = self.config.block_size
        keep = []
        for i, r in enumerate(self.active):
            if r.finished:
                continue
            if len(r.prompt) + len(r.tokens) > bs:  # its next token would sit past the context
                self.windowed.append(r)
            else:
                keep.append(i)
        if not keep:
            self.active, self.pad, self.cache = [], [], None
            return
        cache = self.cache
        if len(keep) < len(self.active):
            cache.reorder(torch.tensor(keep, device=self.device))
            self.active = [self.active[i] for i in keep]
            self.pad = [self.pad[i] for i in keep]
        d = min(self.pad)
        if d:  # a view, not a copy
            cache.k, cache.v = cache.k[:, :, :, d:], cache.v[:, :, :, d:]
            cache.pos -= d
            cache.max_len -= d
            self.pad = [p - d for p in self.pad]

    def _capacity(self, rows: list[_Row], pad: list[int], at_least: int) -> int:
        """Cache slots for these rows to run to the end (or to the context), and at least `at_least`."""
        bs = self.config.block_size
        need = max(p + len(r.prompt) + r.params.max_new_tokens for r, p in zip(rows, pad))
        return max(at_least, min(need, bs))

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)

    def _decode(self) -> torch.Tensor:
        """Feed every cached row its last token: logits (B_active, V)."""
        cache = self.cache
        if cache.pos + 1 > cache.max_len:  # out of room (after joins or trims): grow to the right
            grown = self._new_cache(len(self.active), self._capacity(self.active, self.pad, cache.pos + 1))
            grown.k[:, :, :, :cache.pos] = cache.k[:, :, :, :cache.pos]
            grown.v[:, :, :, :cache.pos] = cache.v[:, :, :, :cache.pos]
            grown.pos = cache.pos
            self.cache = cache = grown
        positions = km = None
        if any(self.pad):
            pad = torch.tensor(self.pad, device=self.device)
            positions = (cache.pos - pad)[:, None]  # (B, 1)
            km = torch.arange(cache.pos + 1, device=self.device)[None, :] >= pad[:, None]  # (B, pos+1)
        idx = torch.tensor([r.tokens[-1] for r in self.active], device=self.device)[:, None]
        self.forward_sizes.append(len(self.active))
        return self._forward(idx, cache=cache, positions=positions, key_mask=km)

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Run the new rows' prompts (left-padded into one batch) and merge their keys and values
        into the running cache: logits (B_new, V) for their first tokens."""
        dev = self.device
        lens = [len(r.prompt) for r in rows]
        T = max(lens)
        pad = [T - n for n in lens]
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, pad[i]:] = torch.tensor(r.prompt)
        positions = km = None
        if any(pad):
            p = torch.tensor(pad, device=dev)
            km = torch.arange(T, device=dev)[None, :] >= p[:, None]  # (B_new, T)
            positions = (torch.arange(T, device=dev)[None, :] - p[:, None]).clamp_(min=0)  # (B_new, T)
        # alone, the new rows' cache is the running one; joining, it only needs the prompts
        first = self.cache is None
        cache = self._new_cache(len(rows), self._capacity(rows, pad, T) if first else T)
        self.forward_sizes.append(len(rows))
        logits = self._forward(idx.to(dev), cache=cache, positions=positions, key_mask=km, last_only=True)
        if first:
            self.cache, self.active, self.pad = cache, list(rows), pad
            return logits
        # right-align both groups at the new write position; slots left of a row stay empty (zeros)
        old, P = self.cache, self.cache.pos
        pos = max(P, T)
        all_rows = self.active + rows
        all_pad = [p + pos - P for p in self.pad] + [p + pos - T for p in pad]
        merged = self._new_cache(len(all_rows), self._capacity(all_rows, all_pad, pos))
        B = len(self.active)
        merged.k[:, :B, :, pos - P:pos] = old.k[:, :, :, :P]
        merged.v[:, :B, :, pos - P:pos] = old.v[:, :, :, :P]
        merged.k[:, B:, :, pos - T:pos] = cache.k[:, :, :, :T]
        merged.v[:, B:, :, pos - T:pos] = cache.v[:, :, :, :T]
        merged.pos = pos
        self.cache, self.active, self.pad = merged, all_rows, all_pad
        return logits

    def _recompute(self) -> torch.Tensor:
        """Rows past the context: nanoGPT's sliding window, the last block_size tokens recomputed."""
        bs = self.config.block_size
        seqs = [(r.prompt + r.tokens)[-bs:] for r in self.windowed]
        T = max(len(s) for s in seqs)
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        pad = torch.tensor([T - len(s) for s in seqs])
        for i, s in enumerate(seqs):
            idx[i, T - len(s):] = torch.tensor(s)
        positions = key_mask = None
        if bool(pad.any()):
            key_mask = (torch.arange(T)[None, :] >= pad[:, None]).to(self.device)
            positions = (torch.arange(T)[None, :] - pad[:, None]).clamp_(min=0).to(self.device)
        self.forward_sizes.append(len(seqs))
        return self._forward(idx.to(self.device), positions=positions, key_mask=key_mask, last_only=True)

    def _screen_k(self, rows: list[_Row]) -> int | None:
        """The number of top logits that can matter for these rows, or None for all of them: every
        row greedy or top-k, and no repetition penalty."""
        V = self.config.vocab_size
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            return None
        k = max(1 if r.params.temperature == 0 else (min(r.params.top_k, V) if r.params.top_k else V) for r in rows)
        return k if k < V else None

    def _forward(self, idx, **kw) -> torch.Tensor:
        """Last-position logits (B, V) in fp32. A screened lm_head (gptkit.quantize) is told when
        only the top-k logits can matter."""
        head = getattr(self.model, "lm_head", None)
        screened = hasattr(head, "top_k") and self.screen_k is not None
        if screened:
            head.top_k = self.screen_k
        try:
            return self.model(idx, **kw)[:, -1, :].float()
        finally:
            if screened:
                head.top_k = None

    def _sampling_tensors(self, rows: list[_Row]) -> None:
        """Per-row settings as tensors, rebuilt whenever the batch's rows change."""
        if rows == self._batch:
            return
        self._batch = list(rows)
        dev = self.device
        V = self.config.vocab_size
        p = [r.params for r in rows]
        self.greedy = torch.tensor([sp.temperature == 0 for sp in p], device=dev)
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        self.temperature = torch.tensor([sp.temperature or 1.0 for sp in p], device=dev)
        self.top_k = torch.tensor([min(sp.top_k, V) if sp.top_k else V for sp in p], device=dev)
        self.top_p = torch.tensor([sp.top_p if sp.top_p is not None else 1.0 for sp in p], device=dev)
        self.penalty = torch.tensor([sp.repetition_penalty for sp in p], device=dev)
        # sampled rows with neither top-k nor top-p draw over the whole vocabulary in its own order:
        # no sort of V logits, which the fused top-k/top-p sampler needs (100 ms for 32 x 50257 here)
        plain = [sp.temperature > 0 and not (sp.top_k and sp.top_k < V) and (sp.top_p is None or sp.top_p >= 1.0)
                 for sp in p]
        filtered = [sp.temperature > 0 and not pl for sp, pl in zip(p, plain)]
        self.plain_rows = torch.tensor([i for i, x in enumerate(plain) if x], dtype=torch.long, device=dev)
        self.filtered_rows = torch.tensor([i for i, x in enumerate(filtered) if x], dtype=torch.long, device=dev)
        self.seen = None
        if any(sp.repetition_penalty != 1.0 for sp in p):
            self.seen = torch.zeros(len(rows), V, dtype=torch.bool, device=dev)
            for i, r in enumerate(rows):
                self.seen[i, torch.tensor(r.prompt + r.tokens, device=dev).clamp(max=V - 1)] = True

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        self._sampling_tensors(rows)
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, self.penalty)
        if self.all_greedy:
            return logits.argmax(dim=-1).cpu()
        u = torch.empty(len(rows))
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            g = self.generator
            u[unseeded] = torch.rand(len(unseeded), generator=g, device=g.device if g is not None else "cpu").cpu()
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, generator=r.generator).item()
        u = u.to(logits.device)
        tokens = logits.argmax(dim=-1) if self.any_greedy else torch.zeros(len(rows), dtype=torch.long,
                                                                                device=logits.device)
        f = self.filtered_rows
        if len(f):
            tokens[f] = sample_from_logits(logits[f], self.temperature[f], self.top_k[f], self.top_p[f], u[f])
        f = self.plain_rows
        if len(f):
            tokens[f] = sample_unfiltered(logits[f], self.temperature[f], u[f])
        return tokens.cpu()

    def _accept(self, i: int, r: _Row, t: int) -> Event:
        r.tokens.append(t)
        if self.seen is not None:
            self.seen[i, t] = True
        if t in r.stop_ids:
            r.tokens.pop()  # the stop token is not part of the text
            r.finished, r.finish_reason = True, "stop"
            text = r.stream.finish() if r.stream else ""
            return Event(r.index, t, text, True, "stop")
        text = ""
        if r.stream is not None:
            text = r.stream.push(r.tb(t))
            if r.stream.stopped:
                r.finished, r.finish_reason = True, "stop"
                return Event(r.index, t, text, True, "stop")
        if len(r.tokens) >= r.params.max_new_tokens:
            r.finished, r.finish_reason = True, "length"
            if r.stream is not None:
                text += r.stream.finish()
            return Event(r.index, t, text, True, "length")
        return Event(r.index, t, text)

    # ------------------------------------------------------------------------------------------
    def completions(self) -> list[Completion]:
        """Run to the end and return one Completion per request, in order."""
        for _ in self:
            pass
        out = []
        for r in self.rows.values():
            text = r.stream.text if r.stream is not None else ""
            out.append(Completion(text, list(r.tokens), r.finish_reason or "length", len(r.prompt)))
        return out


# ----------------------------------------------------------------------------------------------
def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   tokenizer=None, eot: int | None = None) -> list[Completion]:
    """Generate every prompt (token ids) to completion in one batch."""
    return Generation(model, prompts, params, tokenizer, eot).completions()


@torch.inference_mode()
def beam_search(model: GPT, prompt: Sequence[int], num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_token_ids: Iterable[int] = (),
                num_return_sequences: int = 1) -> list[tuple[list[int], float]]:
    """Beam search as transformers does it: returns the best `num_return_sequences` hypotheses as
    (generated token ids including a final EOS, score), best first. The score is the sum of token
    log-probabilities divided by (number of generated tokens) ** length_penalty.
    early_stopping: True stops once num_beams hypotheses are finished; False stops when no running
    beam can beat the worst finished one at its current length; "never" assumes the longest length."""
    if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
        raise GptkitError(f"need 1 <= num_return_sequences ({num_return_sequences}) <= num_beams ({num_beams})",
                          "num_beams", "raise num_beams or lower num_return_sequences")
    cfg = model.config
    dev = model.transformer.wte.weight.device
    prompt = list(prompt)
    if len(prompt) + max_new_tokens > cfg.block_size:
        raise GptkitError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the context "
                          f"({cfg.block_size})", "max_new_tokens", "beam search does not slide past the context")
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=dev)
    n = num_beams
    keep = max(2, 1 + len(eos)) * n  # candidates per step: enough to refill n running beams
    NEG = -1.0e9
    cache = KVCache(cfg, n, len(prompt) + max_new_tokens, dev, model.transformer.wte.weight.dtype)
    idx = torch.tensor([prompt] * n, dtype=torch.long, device=dev)
    logits = model(idx, cache=cache, last_only=True)[:, -1, :].float()  # (n, V)
    V = logits.size(-1)
    run_seq = torch.zeros(n, max_new_tokens, dtype=torch.long, device=dev)  # running hypotheses
    run_score = torch.full((n,), NEG, device=dev)
    run_score[0] = 0.0  # all beams start equal: only the first may expand at step 0
    fin_seq = torch.zeros(n, max_new_tokens, dtype=torch.long, device=dev)
    fin_len = torch.zeros(n, dtype=torch.long, device=dev)
    fin_score = torch.full((n,), NEG, device=dev)
    fin_done = torch.zeros(n, dtype=torch.bool, device=dev)
    improvable = True
    first_n = torch.arange(keep, device=dev) < n
    for g in range(max_new_tokens):  # g tokens generated so far
        total = (torch.log_softmax(logits, dim=-1) + run_score[:, None]).reshape(-1)  # (n*V,)
        cand_score, cand = torch.topk(total, keep)  # (keep,), sorted
        beam, tok = cand // V, cand % V
        seq = run_seq[beam].clone()
        seq[:, g] = tok
        hit = torch.isin(tok, eos) if len(eos) else torch.zeros(keep, dtype=torch.bool, device=dev)
        if g + 1 >= max_new_tokens:
            hit = torch.ones_like(hit)
        # the best n candidates that did not end continue running
        nxt = torch.topk(cand_score + hit.float() * NEG, n).indices
        new_run_seq, new_run_score, reorder = seq[nxt], (cand_score + hit.float() * NEG)[nxt], beam[nxt]
        # among the first n candidates, those that ended become finished hypotheses
        just = hit & first_n
        fscore = cand_score / float(g + 1) ** length_penalty
        if bool(fin_done.all()) and early_stopping is True:
            fscore = fscore + NEG
        if not improvable:
            fscore = fscore + NEG
        fscore = fscore + (~just).float() * NEG
        m_score = torch.cat([fin_score, fscore])
        m_seq = torch.cat([fin_seq, seq])
        m_len = torch.cat([fin_len, torch.full((keep,), g + 1, device=dev)])
        m_done = torch.cat([fin_done, just])
        top = torch.topk(m_score, n).indices
        fin_score, fin_seq, fin_len, fin_done = m_score[top], m_seq[top], m_len[top], m_done[top]
        run_seq, run_score = new_run_seq, new_run_score
        # can a running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_new_tokens
        else:
            best_len = g + 1
        best_possible = float(run_score[0]) / best_len ** length_penalty
        worst = float(fin_score.min()) if bool(fin_done.all()) else NEG
        improvable = improvable and best_possible > worst
        if not improvable or (bool(fin_done.all()) and early_stopping is True) or bool(hit.all()):
            break
        cache.reorder(reorder)
        logits = model(new_run_seq[:, g:g + 1], cache=cache)[:, -1, :].float()
    out = []
    for i in range(num_return_sequences):
        out.append((fin_seq[i, : int(fin_len[i])].tolist(), float(fin_score[i])))
    return out
