"""Text-level inference: a model and its tokenizer loaded for generation, prompts as text, and
`gptkit sample`'s output. The engine underneath (`gptkit.generate`, `gptkit.beam`) knows tokens only.

`load_for_inference` is the one loader both `gptkit sample` and the server use: the model moved to
its device in eval mode, as `quantize_for_inference`'s copy in the chosen weight precision.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch

from gptkit.beam import beam_search
from gptkit.errors import GptkitError
from gptkit.generate import Generation, SamplingParams, prepare_prompt
from gptkit.loading import load_model
from gptkit.quantize import quantize_for_inference
from gptkit.runtime import pick_device
from gptkit.speculative import ModelDrafter, NgramDrafter, speculative_generate
from gptkit.tokenizer import tokenizer_for

# the CLI's spelling of SamplingParams' fields, for error messages
OPTION_NAMES = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "repetition_penalty": "--repetition-penalty"}


def load_for_inference(model_path: str, vocab: str | None = None, device: str = "auto", dtype: str = "float32"):
    """(model on its device, in eval mode, as quantize_for_inference's copy in `dtype`, tokenizer) for
    `model_path`. For float32 the copy keeps the values, with weights laid out for fast decoding."""
    loaded = load_model(model_path)
    tok = tokenizer_for(loaded, vocab)
    model = loaded.model.to(pick_device(device)).eval()
    n_params = model.num_params()
    model = quantize_for_inference(model, dtype, inplace=True)
    model.serving_num_params = n_params  # num_params() counts nn.Parameters, which the copy stores as buffers
    return model, tok


def default_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens, with the bos a tokenizer adds (Llama's <s>, as transformers encodes);
    an empty prompt starts from bos, else <|endoftext|> (BPE), else a newline (chars)."""
    ids = tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
    if not ids:
        start = tokenizer.bos if tokenizer.bos is not None else tokenizer.eot
        ids = [start] if start is not None else tokenizer.encode("\n")
    return ids


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                        num_samples: int = 1) -> None:
    """Raise GptkitError naming the CLI option of a bad sampling argument."""
    SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p).validate(
        OPTION_NAMES)
    if top_k is not None and top_k <= 0:
        raise GptkitError(f"must be > 0, got {top_k}", "--top-k", "give a positive top-k, or leave it out")
    if num_samples < 1:
        raise GptkitError(f"must be >= 1, got {num_samples}", "--num-samples", "ask for at least one sample")


def sample_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                num_samples: int = 1, device: torch.device | str = "cpu", **params) -> list[str]:
    """Decoded continuations of `prompt` (the prompt is not repeated), one per sample; sample i
    uses seed + i. Extra keyword arguments are SamplingParams fields (stop, repetition_penalty...)."""
    ids = default_prompt_ids(tokenizer, prompt)
    sps = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=None if seed is None else seed + i, **params) for i in range(num_samples)]
    was_training = model.training
    model.eval()
    try:
        return [c.text for c in Generation(model, [ids] * num_samples, sps, tokenizer).completions()]
    finally:
        model.train(was_training)


def run_sample(model_path: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None, num_samples: int = 1,
               vocab: str | None = None, device: str = "auto", out=None, *, stop: list[str] | None = None,
               repetition_penalty: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
               dtype: str = "float32", truncate: bool = False, speculative: str | None = None,
               draft_model: str | None = None, draft_k: int = 4) -> list[str]:
    """`gptkit sample`: load a model and print each sample as it is generated.

    Samples run in one batch; the first unfinished one (in order) is printed live, the others
    appear in turn. With num_beams > 1, beam search prints the num_samples best beams."""
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
    model, tok = load_for_inference(model_path, vocab, device, dtype)
    sp = SamplingParams(**{**sp.__dict__, "stop_token_ids": tuple(tok.stop_ids)})  # eos, end-of-turn tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = prepare_prompt(default_prompt_ids(tok, prompt), model.config.block_size, truncate, "--prompt")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    bs = model.config.block_size
    if len(ids) + max_new_tokens > bs:  # the model was trained on windows of bs tokens: say what happens past them
        what = ("beam search stops there" if num_beams > 1 else
                f"past it, generation slides its window (each new token sees the last {bs} tokens only)")
        print(f"warning: the prompt's {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceed the model's "
              f"context of {bs} tokens: {what}", file=sys.stderr)
    if num_beams > 1:
        return _print_beams(model, tok, prompt, ids, max_new_tokens, tuple(stop or ()), num_beams, length_penalty,
                            num_samples, write)
    if speculative or draft_model:
        return _print_speculative(model, tok, prompt, ids, sp, seed, num_samples, vocab, device, dtype,
                                  draft_model, draft_k, write)
    sps = [SamplingParams(**{**sp.__dict__, "seed": None if seed is None else seed + i}) for i in range(num_samples)]
    return _print_samples(Generation(model, [ids] * num_samples, sps, tok), prompt, num_samples, write)


def _print_beams(model, tok, prompt: str, ids: list[int], max_new_tokens: int, stops: tuple[str, ...],
                 num_beams: int, length_penalty: float, num_samples: int, write: Callable[[str], object]) -> list[str]:
    """Beam search's num_samples best beams as text, cut at the first stop string, each printed."""
    eos = list(tok.stop_ids)
    beams = beam_search(model, ids, num_beams, min(max_new_tokens, model.config.block_size - len(ids)),
                        length_penalty, early_stopping=True, eos_token_ids=eos, num_return_sequences=num_samples)
    texts = []
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


def _encode_or_none(tok, text: str):
    try:
        return tok.encode(text)
    except GptkitError:  # a char vocabulary without some of the probe's characters
        return None


def same_tokenizer(a, b) -> bool:
    """Do two tokenizers map ids to the same text (checked on a spread of ids and a probe text)?"""
    if a.vocab_size != b.vocab_size or a.eot != b.eot:
        return False
    probe = "Hello, world! The quick brown fox.\n  def f(x): return x * 2"
    if _encode_or_none(a, probe) != _encode_or_none(b, probe):
        return False
    ids = range(0, a.vocab_size, max(1, a.vocab_size // 1024))
    return all(a.decode([i]) == b.decode([i]) for i in ids)


def _print_speculative(model, tok, prompt: str, ids: list[int], sp: SamplingParams, seed: int | None,
                       num_samples: int, vocab, device, dtype, draft_model: str | None, draft_k: int,
                       write: Callable[[str], object]) -> list[str]:
    """`--speculative ngram` or `--draft-model`: each sample by speculative decoding (batch 1, one
    sample after the other); the same text as without it. Acceptance goes to stderr."""
    if sp.repetition_penalty != 1.0 or sp.stop:
        raise GptkitError("speculative decoding takes temperature, top-k and top-p only", "--speculative",
                          "drop --repetition-penalty and --stop, or speculative decoding")
    if draft_k < 1:
        raise GptkitError(f"must be >= 1, got {draft_k}", "--draft-k", "draft at least one token per step")
    drafter = NgramDrafter()
    if draft_model:
        dmodel, dtok = load_for_inference(draft_model, vocab, device, dtype)
        if not same_tokenizer(tok, dtok) or dmodel.config.vocab_size != model.config.vocab_size:
            raise GptkitError("the draft model's tokenizer differs from the model's", "--draft-model",
                              "use a draft model trained with the same tokenizer (e.g. gpt2 for gpt2-xl)")
        drafter = ModelDrafter(dmodel)
    texts = []
    for i in range(num_samples):
        g = torch.Generator().manual_seed(seed + i) if seed is not None else None
        drafter.generator = g
        out, stats = speculative_generate(model, ids, drafter, sp.max_new_tokens, draft_k, sp.temperature, sp.top_k,
                                          sp.top_p, sp.stop_token_ids, g)
        text = tok.decode(out)
        texts.append(text)
        if num_samples > 1:
            write(f"--- sample {i + 1} ---\n")
        write(prompt + text + "\n")
        print(f"speculative: {stats.accepted}/{stats.drafted} drafts accepted, {stats.new_tokens} tokens in "
              f"{stats.target_passes} passes of the model", file=sys.stderr)
    return texts


def _print_samples(gen: Generation, prompt: str, num_samples: int, write: Callable[[str], object]) -> list[str]:
    """Run the batch, printing the first unfinished sample live and the others in turn; their texts."""
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
