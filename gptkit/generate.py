"""The generation engine: batches of prompts (token ids) with their own settings, stop conditions
and streaming text.

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
  `gptkit.batch_cache.BatchCache` owns that ragged layout (compact, grow, merge). A row that
  outgrows the context leaves the cache and is recomputed over its last block_size tokens, on its
  own, while the others go on through the cache.
- Chunked prefill (a server's, `prefill_chunk` > 0): a prompt longer than prefill_chunk tokens is
  prefilled that many tokens per step, into a cache of its own, while the running rows go on
  decoding a token per step; after its last chunk it joins the running cache and gets its first
  token. One long prompt at a time; its tokens are the ones an unchunked prefill gives.
- Preemption (a server's): `park` takes a row out of the batch with its state, `resume` prefills
  its prompt and tokens again. `batch_invariant` runs each row's forward passes on their own, so
  its logits are bit-identical whatever else runs (slower).
- The engine knows tokens only. With a tokenizer, each row's tokens also go through a
  `gptkit.textstream.TextStream` (incremental UTF-8, stop strings that may span tokens).
- A seeded row draws its uniform numbers from its own generator, so its sample does not depend on
  which other requests share the batch. Choosing the tokens is `gptkit.batch_sampler`'s, the
  sampling math itself `gptkit.sample`'s; logprobs are `gptkit.logprobs`'.
- A prompt longer than the context is an error, or is cut to its last tokens with a warning
  (`truncate=True`). Past the context, generation goes on with nanoGPT's sliding window: each step
  recomputes the last block_size tokens.

Beam search is `gptkit.beam`; text-level inference (loading, `gptkit sample`) is `gptkit.inference`.

Shapes: B rows, T time, V vocab.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from gptkit.errors import GptkitError
from gptkit.batch_cache import BatchCache, left_pad_inputs, row_view
from gptkit.batch_sampler import BatchSampler
from gptkit.logprobs import attach_logprobs
from gptkit.model import GPT
from gptkit.quantize import only_top_k_logits, prefill_kernels
from gptkit.sample import sample_next
from gptkit.textstream import TextStream, token_bytes_fn


@dataclass
class SamplingParams:
    """One request's settings. temperature 0 = greedy; top_k None/0 and top_p None/1 = off."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated so far
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit
    stop: Sequence[str] = ()  # stop strings, matched on the decoded text; not returned
    stop_token_ids: Sequence[int] = ()  # besides the tokenizer's <|endoftext|>
    ignore_eot: bool = False  # keep going past <|endoftext|> (benchmarks)
    seed: int | None = None
    logprobs: int | None = None  # OpenAI's: each new token's logprob and the top-N alternatives (None: off)

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
    logprob: float | None = None  # with params.logprobs: the token's log-probability under the model
    top_logprobs: list[tuple[int, float]] | None = None  # ... and the N most likely (id, logprob)


@dataclass
class Completion:
    """A finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


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


def _left_padded(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
    """Token lists as one left-padded batch: idx (B, T) on the CPU and each row's padding."""
    T = max(len(s) for s in seqs)
    pad = [T - len(s) for s in seqs]
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, pad[i]:] = torch.tensor(s)
    return idx, pad


class _Row:
    """One request's state: its tokens so far, its stop conditions, its text stream and generator."""

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
        self.parked = False  # out of the batch until `Generation.resume`

    def accept(self, t: int) -> Event:
        """Take the new token t and say what it did: extended the text, or ended the row."""
        self.tokens.append(t)
        if t in self.stop_ids:
            self.tokens.pop()  # the stop token is not part of the text
            self.finished, self.finish_reason = True, "stop"
            text = self.stream.finish() if self.stream else ""
            return Event(self.index, t, text, True, "stop")
        text = ""
        if self.stream is not None:
            text = self.stream.push(self.tb(t))
            if self.stream.stopped:
                self.finished, self.finish_reason = True, "stop"
                return Event(self.index, t, text, True, "stop")
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finished, self.finish_reason = True, "length"
            if self.stream is not None:
                text += self.stream.finish()
            return Event(self.index, t, text, True, "length")
        return Event(self.index, t, text)


class Generation:
    """A batch of requests generated together, one token per row per `step()`; requests may join
    while it runs (`add`), and finished ones leave it.

    prompts: token id lists (already checked with `prepare_prompt`); params: one SamplingParams
    for all or one per prompt; tokenizer (optional) turns tokens into text and enables stop
    strings; eot: the end-of-text id (default: the tokenizer's); generator: the random stream of
    rows without a seed (default: torch's global RNG). Prompts may be empty: `add` them later.

    Rows live in four groups: `active` ones run through the KV cache (`BatchCache`, in the same
    order), `windowed` ones are past the context and recomputed, `joining` ones are prefilled at
    the next step, `prefilling` ones (long prompts, with `prefill_chunk` > 0) a chunk per step.
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
        self.tokenizer = tokenizer
        if eot is None and tokenizer is not None:
            eot = tokenizer.eot
        self.eot = eot
        self.tb = token_bytes_fn(tokenizer) if tokenizer is not None else None
        self.rows: dict[int, _Row] = {}  # index -> row, until `release(index)`
        self.next_index = 0
        self.active: list[_Row] = []  # rows whose keys/values are in self.cache, in cache order
        self.cache = BatchCache(self.config, self.device, model.transformer.wte.weight.dtype)
        self.windowed: list[_Row] = []  # rows past the context: their last block_size tokens, recomputed
        self.joining: list[_Row] = []  # added, prefilled at the next step
        # > 0: a prompt longer than this is prefilled this many tokens per step (the server's
        # --prefill-chunk); the first row of `prefilling` runs, into its own cache `chunk_kv`
        self.prefill_chunk = 0
        self.prefilling: list[_Row] = []
        self.chunk_kv = None
        self.pending: list[Event] = []
        self.forward_sizes: list[int] = []  # rows in each forward pass of the last step
        self.sampler = BatchSampler(self.config.vocab_size, self.device, generator)
        self.screen_k: int | None = None  # the top logits this step's rows need (None: all)
        # True: every row runs its own forward passes (a batch of one), so its logits, and so its
        # tokens, never depend on which other rows share the batch (slower: one pass per row)
        self.batch_invariant = False
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
        return all(r.finished for r in (*self.active, *self.windowed, *self.joining, *self.prefilling))

    @property
    def running(self) -> int:
        """Unfinished requests, running or about to join."""
        return sum(not r.finished for r in (*self.active, *self.windowed, *self.joining, *self.prefilling))

    def cancel(self, index: int) -> None:
        """Stop request `index` (e.g. its client went away); it leaves the batch at the next step."""
        r = self.rows.get(index)
        if r is not None and not r.finished:
            r.finished, r.finish_reason = True, "stop"
            self.pending.append(Event(index, None, "", True, "stop"))

    def park(self, index: int) -> None:
        """Take running request `index` out of the batch at the next step, keeping its tokens, random
        stream and text state (a server's preemption); `resume` brings it back."""
        r = self.rows[index]
        if not r.finished:
            r.parked = True

    def resume(self, index: int) -> None:
        """Bring a parked request back: at the next step its prompt and the tokens it generated so
        far are prefilled again (recompute), and it goes on as if it had never left."""
        r = self.rows[index]
        if r.parked:
            r.parked = False
            if not r.finished and r not in self.joining and r not in self.prefilling:
                self.joining.append(r)

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
        """Run one token for every unfinished row: a decode pass over the cached rows, a prefill
        pass over rows that join now, and a recompute pass over rows past the context."""
        events, self.pending = self.pending, []
        self.forward_sizes = []
        self.joining = [r for r in self.joining if not (r.finished or r.parked)]
        self.windowed = [r for r in self.windowed if not (r.finished or r.parked)]
        self._compact()
        joining, self.joining = self._split_long(self.joining), []
        if not (self.active or self.windowed or joining or self.prefilling):
            return events
        last_chunk = self.prefilling[:1] if self._last_chunk_now() else []  # gets its first token now
        sampling = [*self.active, *self.windowed, *joining, *last_chunk]
        self.screen_k = self.sampler.screen_k(sampling) if sampling else None
        parts = []
        if self.active:
            parts.append(self._decode())
        if joining:
            parts.append(self._prefill(joining))  # the new rows join self.active at its end
        if self.prefilling:
            parts.append(self._prefill_chunk())  # after its last chunk, the row joins self.active too
        if self.windowed:
            parts.append(self._recompute())
        parts = [p for p in parts if p is not None]
        if not parts:  # only a chunk of a long prompt ran: no row gets a token this step
            return events
        rows = self.active + self.windowed
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        tokens = self.sampler.choose(rows, logits)  # (B,) on the CPU
        new = [r.accept(t) for r, t in zip(rows, tokens.tolist())]
        attach_logprobs(rows, logits, tokens, new)
        events.extend(new)
        return events

    def completions(self) -> list[Completion]:
        """Run to the end and return one Completion per request, in order."""
        for _ in self:
            pass
        out = []
        for r in self.rows.values():
            text = r.stream.text if r.stream is not None else ""
            out.append(Completion(text, list(r.tokens), r.finish_reason or "length", len(r.prompt)))
        return out

    # ------------------------------------------------------------------------------------------
    def _compact(self) -> None:
        """Drop finished rows from the cache and move rows that outgrew the context to the
        recompute group."""
        bs = self.config.block_size
        keep = []
        for i, r in enumerate(self.active):
            if r.finished or r.parked:
                continue
            if len(r.prompt) + len(r.tokens) > bs:  # its next token would sit past the context
                self.windowed.append(r)
            else:
                keep.append(i)
        self.cache.keep(keep)
        self.active = [self.active[i] for i in keep]

    def _forward(self, idx: torch.Tensor, **kw) -> torch.Tensor:
        """Last-position logits (B, V) in fp32; only the top `screen_k` need be exact."""
        self.forward_sizes.append(idx.size(0))
        if kw.get("last_only"):  # a prefill (or recompute): int8 weights take their prefill kernel
            with prefill_kernels(self.model), only_top_k_logits(self.model, self.screen_k):
                return self.model(idx, **kw)[:, -1, :].float()
        with only_top_k_logits(self.model, self.screen_k):
            return self.model(idx, **kw)[:, -1, :].float()

    def _decode(self) -> torch.Tensor:
        """Feed every cached row its last token: logits (B_active, V)."""
        positions, key_mask = self.cache.decode_inputs()
        idx = torch.tensor([r.tokens[-1] for r in self.active], device=self.device)[:, None]
        kv = self.cache.kv
        if self.batch_invariant:  # each row alone, over its own slots of the cache
            out = torch.cat([self._forward(idx[i:i + 1], cache=row_view(kv, i, p, kv.pos - p))
                             for i, p in enumerate(self.cache.pad)])
            kv.pos += 1
            return out
        return self._forward(idx, cache=kv, positions=positions, key_mask=key_mask)

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Run the new rows' prompts (left-padded into one batch) and add their keys and values to
        the running cache: logits (B_new, V) for their first tokens."""
        idx, pad = _left_padded([r.prompt + r.tokens for r in rows])  # a resumed row recomputes its tokens too
        T = idx.size(1)
        need = [len(r.prompt) + r.params.max_new_tokens for r in rows]
        positions, key_mask = left_pad_inputs(pad, 0, T, self.device)
        kv = self.cache.prefill_cache(pad, need, T)
        if self.batch_invariant:  # each row alone, into its own slots of the new cache
            logits = torch.cat([self._forward(idx[i:i + 1, p:].to(self.device), cache=row_view(kv, i, p, 0),
                                              last_only=True) for i, p in enumerate(pad)])
            kv.pos = T
        else:
            logits = self._forward(idx.to(self.device), cache=kv, positions=positions, key_mask=key_mask,
                                   last_only=True)
        self.cache.admit(kv, pad, need)
        self.active = self.active + rows
        return logits

    def _split_long(self, joining: list[_Row]) -> list[_Row]:
        """With chunked prefill on, move the joining rows whose prefill is longer than a chunk to the
        back of `prefilling`, and drop finished and parked ones from it; returns the other rows."""
        if self.prefilling and (self.prefilling[0].finished or self.prefilling[0].parked):
            self.chunk_kv = None  # the row in progress left: its partial cache goes
        self.prefilling = [r for r in self.prefilling if not (r.finished or r.parked)]
        # dynamic NTK RoPE picks its frequencies by the pass's longest position: chunks would differ
        if self.prefill_chunk <= 0 or getattr(self.model, "rope_dynamic_from", 0):
            return joining
        long = [len(r.prompt) + len(r.tokens) > self.prefill_chunk for r in joining]
        self.prefilling += [r for r, x in zip(joining, long) if x]
        return [r for r, x in zip(joining, long) if not x]

    def _last_chunk_now(self) -> bool:
        """Does the long prompt in progress run its last chunk this step?"""
        if not self.prefilling:
            return False
        r, done = self.prefilling[0], self.chunk_kv.pos if self.chunk_kv is not None else 0
        return self.prefill_chunk <= 0 or len(r.prompt) + len(r.tokens) - done <= self.prefill_chunk

    def _prefill_chunk(self) -> torch.Tensor | None:
        """Run the next chunk of the first long prompt into its own cache. After its last chunk, the
        row joins the running cache (at the end of self.active): logits (1, V) for its first
        token; before that, None."""
        r = self.prefilling[0]
        seq = r.prompt + r.tokens  # a resumed row recomputes its tokens too
        need = [len(r.prompt) + r.params.max_new_tokens]
        if self.chunk_kv is None:
            self.chunk_kv = self.cache.prefill_cache([0], need, len(seq))
        kv = self.chunk_kv
        end = min(kv.pos + self.prefill_chunk, len(seq)) if self.prefill_chunk > 0 else len(seq)  # (turned off)
        idx = torch.tensor([seq[kv.pos:end]], device=self.device)  # (1, chunk): positions kv.pos..end-1
        if end < len(seq):
            self.forward_sizes.append(1)
            with prefill_kernels(self.model):
                self.model(idx, cache=kv, last_only=True)  # keys and values only
            return None
        logits = self._forward(idx, cache=kv, last_only=True)
        self.prefilling.pop(0)
        self.chunk_kv = None
        self.cache.admit(kv, [0], need)
        self.active.append(r)
        return logits

    def _recompute(self) -> torch.Tensor:
        """Rows past the context: nanoGPT's sliding window, the last block_size tokens recomputed."""
        bs = self.config.block_size
        seqs = [(r.prompt + r.tokens)[-bs:] for r in self.windowed]
        if self.batch_invariant:
            return torch.cat([self._forward(torch.tensor([q], device=self.device), last_only=True) for q in seqs])
        idx, pad = _left_padded(seqs)
        positions, key_mask = left_pad_inputs(pad, 0, idx.size(1), self.device)
        return self._forward(idx.to(self.device), positions=positions, key_mask=key_mask, last_only=True)


# ----------------------------------------------------------------------------------------------
# Simple entry points on top of the engine, for scripts, tests and benchmarks.

def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   tokenizer=None, eot: int | None = None) -> list[Completion]:
    """Generate every prompt (token ids) to completion in one batch."""
    return Generation(model, prompts, params, tokenizer, eot).completions()


@torch.no_grad()
def generate_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing idx (B, T) with no stop
    condition. use_cache=False recomputes the whole (windowed) sequence at every step: the
    reference the KV cache must match."""
    model.eval()
    if not use_cache:
        T_max = model.config.block_size
        seq = idx
        for _ in range(max_new_tokens):
            nxt = sample_next(model(seq[:, -T_max:])[:, -1, :], temperature, top_k, top_p, generator)
            yield nxt
            seq = torch.cat([seq, nxt[:, None].to(seq.device)], dim=1)
        return
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    gen = Generation(model, idx.tolist(), sp, eot=None, generator=generator)
    while not gen.done:
        events = [e for e in gen.step() if e.token is not None]
        yield torch.tensor([e.token for e in events], device=idx.device)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, eot: int | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """idx (B, T) -> (B, T + n) with n <= max_new_tokens; stops early once every row produced `eot`."""
    out = [idx]
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for nxt in generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache):
        out.append(nxt[:, None])
        if eot is not None:
            done |= nxt == eot
            if done.all():
                break
    return torch.cat(out, dim=1)
