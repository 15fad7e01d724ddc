"""Sampling: logits filters as pure functions, and a KV-cache generation loop.

Temperature 0 means greedy. Filters take logits (B, V) and return logits with the removed
entries set to -inf. Generation prefills the prompt once, then feeds one token at a time through
the KV cache; past the context length it falls back to recomputing the last block_size tokens
(nanoGPT's sliding window), so results never depend on whether the cache is used.
"""

from __future__ import annotations

from typing import Iterator

import torch

from gptkit.model import GPT, KVCache


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


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing idx (B, T)."""
    model.eval()
    T_max = model.config.block_size
    device = idx.device
    cache = None
    if use_cache and idx.size(1) < T_max:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, idx.size(0), min(T_max, idx.size(1) + max_new_tokens), device, dtype)
        logits = model(idx, cache=cache)[:, -1, :]
    else:
        logits = model(idx[:, -T_max:])[:, -1, :]
    seq = idx
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        yield nxt
        seq = torch.cat([seq, nxt[:, None].to(device)], dim=1)
        if i == max_new_tokens - 1:
            break
        if cache is not None and cache.pos < cache.max_len:
            logits = model(nxt[:, None], cache=cache)[:, -1, :]
        else:
            cache = None
            logits = model(seq[:, -T_max:])[:, -1, :]


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


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample_text(model: GPT, tokenizer, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                num_samples: int = 1, device: torch.device | str = "cpu") -> list[str]:
    """Decoded continuations of `prompt` (the prompt is not repeated). An empty prompt starts
    from <|endoftext|> for BPE models and from a newline for char models."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eot] if tokenizer.eot is not None else tokenizer.encode("\n")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = make_generator(seed, device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, gen, eot=tokenizer.eot)
    texts = []
    for row in out[:, len(ids):].tolist():
        if tokenizer.eot is not None and tokenizer.eot in row:
            row = row[: row.index(tokenizer.eot)]
        texts.append(tokenizer.decode(row))
    return texts


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                        num_samples: int = 1) -> None:
    from gptkit.errors import GptkitError

    if max_new_tokens < 0:
        raise GptkitError(f"must be >= 0, got {max_new_tokens}", "--max-new-tokens")
    if not temperature >= 0:
        raise GptkitError(f"must be >= 0, got {temperature}", "--temperature", "0 means greedy")
    if top_k is not None and top_k <= 0:
        raise GptkitError(f"must be > 0, got {top_k}", "--top-k")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptkitError(f"must be in (0, 1], got {top_p}", "--top-p")
    if num_samples < 1:
        raise GptkitError(f"must be >= 1, got {num_samples}", "--num-samples")


def run_sample(model_path: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None, num_samples: int = 1,
               vocab: str | None = None, device: str = "auto", out=print) -> list[str]:
    """`gptkit sample`: load a model, sample, print each sample."""
    from gptkit.errors import GptkitError
    from gptkit.loading import load_model
    from gptkit.runtime import pick_device
    from gptkit.tokenizer import tokenizer_for

    check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples)
    loaded = load_model(model_path)
    tok = tokenizer_for(loaded, vocab)
    dev = pick_device(device)
    model = loaded.model.to(dev)
    n_prompt = len(tok.encode(prompt)) if prompt else 1
    if n_prompt >= model.config.block_size:
        raise GptkitError(f"prompt has {n_prompt} tokens, the model's context is {model.config.block_size}",
                          "--prompt", "shorten the prompt")
    texts = sample_text(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples, dev)
    for i, t in enumerate(texts):
        if num_samples > 1:
            out(f"--- sample {i + 1} ---")
        out(prompt + t)
    return texts
