"""Sampling strategies as pure functions of logits, plus the simple generation helpers.

Shapes: B rows, V vocab, K candidates. Temperature 0 means greedy. Filters take logits (B, V) and
return logits with the removed entries set to -inf; they compose in the order transformers applies
them (repetition penalty, then temperature, top-k, top-p).

`sample_from_logits` is the fused version the engine uses: it keeps only the top-k candidates (or
sorts the row when there is no top-k), applies temperature/top-p on that small set, and draws by
inverse CDF from one uniform number per row. Drawing from a caller-given uniform makes a seeded row
reproducible no matter which other rows share its batch.

The batched, streaming engine (stop strings, beams, padding) lives in `gptkit.generate`; the
functions at the bottom of this file are thin wrappers kept for the CLI and the trainer.
"""

from __future__ import annotations

from typing import Iterator

import torch


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability sums to >= p
    (always at least the most likely token)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    cum = probs.cumsum(dim=-1)
    remove = cum - probs > p  # tokens whose preceding mass already reaches p
    remove[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty (as transformers applies it): for tokens already in the context,
    positive logits are divided by `penalty` and negative ones multiplied by it.
    logits (B, V); seen (B, V) bool; penalty a number or (B,) -> logits (B, V)."""
    if not torch.is_tensor(penalty):
        if penalty == 1.0:
            return logits
        penalty = torch.tensor(float(penalty), device=logits.device)
    pen = penalty.to(logits.dtype).reshape(-1, 1) if penalty.dim() else penalty.to(logits.dtype)
    scaled = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, scaled, logits)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), by the reference filters and torch.multinomial."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def candidate_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution top-k/top-p sampling draws from, on a small candidate set.

    logits (B, V) float; temperature (B,) > 0; top_k (B,) int in [1, V] (V = no top-k); top_p (B,)
    in (0, 1] (1 = no top-p). Returns probs (B, K), unnormalised with removed entries 0, in
    descending order, and their token ids (B, K)."""
    V = logits.size(-1)
    kmax = int(top_k.max())
    if kmax < V:
        vals, ids = torch.topk(logits, kmax, dim=-1)  # (B, K), sorted
    else:
        vals, ids = torch.sort(logits, dim=-1, descending=True)
    vals = vals.float() / temperature.float()[:, None]
    col = torch.arange(vals.size(1), device=vals.device)
    vals = vals.masked_fill(col[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    cum = probs.cumsum(dim=-1)
    remove = (cum - probs) > top_p.float()[:, None]  # the preceding mass already reaches p
    remove[:, 0] = False
    return probs.masked_fill(remove, 0.0), ids


def sample_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       u: torch.Tensor) -> torch.Tensor:
    """Fused temperature + top-k + top-p sampling: token ids (B,) drawn by inverse CDF with the
    uniform numbers u (B,) in [0, 1). Arguments as in `candidate_probs`."""
    probs, ids = candidate_probs(logits, temperature, top_k, top_p)
    cdf = probs.cumsum(dim=-1)  # (B, K)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.size(1) - 1)  # first cdf > target
    return ids.gather(1, j).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Simple helpers on top of the engine (gptkit.generate), kept for the CLI, the trainer and scripts.


@torch.no_grad()
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing idx (B, T) with no stop
    condition. use_cache=False recomputes the whole (windowed) sequence at every step: the
    reference the KV cache must match."""
    from gptkit.generate import Generation, SamplingParams

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
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
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


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def default_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|> (BPE) or a newline (chars)."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eot] if tokenizer.eot is not None else tokenizer.encode("\n")
    return ids


def sample_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                num_samples: int = 1, device: torch.device | str = "cpu", **params) -> list[str]:
    """Decoded continuations of `prompt` (the prompt is not repeated), one per sample; sample i
    uses seed + i. Extra keyword arguments are SamplingParams fields (stop, repetition_penalty...)."""
    from gptkit.generate import Generation, SamplingParams

    ids = default_prompt_ids(tokenizer, prompt)
    sps = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=None if seed is None else seed + i, **params) for i in range(num_samples)]
    was_training = model.training
    model.eval()
    try:
        return [c.text for c in Generation(model, [ids] * num_samples, sps, tokenizer).completions()]
    finally:
        model.train(was_training)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                        num_samples: int = 1) -> None:
    from gptkit.errors import GptkitError
    from gptkit.generate import SamplingParams

    SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p).validate(
        OPTION_NAMES)
    if top_k is not None and top_k <= 0:
        raise GptkitError(f"must be > 0, got {top_k}", "--top-k", "give a positive top-k, or leave it out")
    if num_samples < 1:
        raise GptkitError(f"must be >= 1, got {num_samples}", "--num-samples", "ask for at least one sample")


OPTION_NAMES = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "repetition_penalty": "--repetition-penalty"}


def run_sample(model_path: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None, num_samples: int = 1,
               vocab: str | None = None, device: str = "auto", out=None, *, stop: list[str] | None = None,
               repetition_penalty: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
               dtype: str = "float32", truncate: bool = False) -> list[str]:
    """`gptkit sample`: load a model and print each sample as it is generated.

    Samples run in one batch; the first unfinished one (in order) is printed live, the others
    appear in turn. With num_beams > 1, beam search prints the num_samples best beams."""
    import sys
    import warnings

    from gptkit.errors import GptkitError
    from gptkit.generate import Generation, SamplingParams, beam_search, prepare_prompt
    from gptkit.loading import load_model
    from gptkit.quantize import quantize_for_inference
    from gptkit.runtime import pick_device
    from gptkit.tokenizer import tokenizer_for

    write = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, stop=tuple(stop or ()))
    sp.validate(OPTION_NAMES)
    if num_beams < 1:
        raise GptkitError(f"must be >= 1, got {num_beams}", "--num-beams", "use 1 for no beam search")
    if num_beams > 1 and num_samples > num_beams:
        raise GptkitError(f"--num-samples {num_samples} is more than --num-beams {num_beams}", "--num-samples",
                          "beam search returns at most num_beams sequences")
    loaded = load_model(model_path)
    tok = tokenizer_for(loaded, vocab)
    dev = pick_device(device)
    model = quantize_for_inference(loaded.model.to(dev).eval(), dtype, inplace=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = prepare_prompt(default_prompt_ids(tok, prompt), model.config.block_size, truncate, "--prompt")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if truncate and len(ids) + max_new_tokens > model.config.block_size and num_beams == 1:
        print(f"warning: past {model.config.block_size} tokens, generation slides its context window",
              file=sys.stderr)
    texts: list[str] = []
    if num_beams > 1:
        stops = tuple(stop or ())
        eos = [tok.eot] if tok.eot is not None else []
        beams = beam_search(model, ids, num_beams, min(max_new_tokens, model.config.block_size - len(ids)),
                            length_penalty, early_stopping=True, eos_token_ids=eos, num_return_sequences=num_samples)
        for i, (seq, score) in enumerate(beams):
            seq = [t for t in seq if t not in eos]
            text = tok.decode(seq)
            cut = [p for p in (text.find(s) for s in stops) if p >= 0]
            text = text[: min(cut)] if cut else text
            texts.append(text)
            if num_samples > 1:
                write(f"--- beam {i + 1} (score {score:.4f}) ---\n")
            write(prompt + text + "\n")
        return texts
    sps = [SamplingParams(**{**sp.__dict__, "seed": None if seed is None else seed + i}) for i in range(num_samples)]
    gen = Generation(model, [ids] * num_samples, sps, tok)
    pieces = [[] for _ in range(num_samples)]
    finished = [False] * num_samples
    cur = 0

    def header(i):
        if num_samples > 1:
            write(f"--- sample {i + 1} ---\n")
        write(prompt + "".join(pieces[i]))

    header(0)
    for ev in gen:
        pieces[ev.index].append(ev.text)
        if ev.index == cur and ev.text:
            write(ev.text)
        if ev.finished:
            finished[ev.index] = True
        while cur < num_samples and finished[cur]:
            write("\n")
            cur += 1
            if cur < num_samples:
                header(cur)
    return ["".join(p) for p in pieces]
