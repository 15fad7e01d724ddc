"""SFT end to end: ~50 synthetic chat pairs -> `prepare chat` -> train -> serve; the model answers a
held-back question of the same pattern. Slow: a 50257-token vocabulary makes every step cost."""

import json
import random

import pytest
import torch

from conftest import data_file, post_json

WORDS = ["apple", "tree", "river", "stone", "cloud", "green", "music", "paper", "light", "water", "house", "night"]


def _conv(a: str, b: str, answer: bool = True) -> list[dict]:
    msgs = [{"role": "user", "content": f"Repeat after me:\n{a} {b}"}]
    return msgs + ([{"role": "assistant", "content": f"{a} {b}"}] if answer else [])


def _post(url: str, body: dict) -> tuple[int, dict]:
    return post_json(url, body, timeout=60)


@pytest.mark.slow
def test_sft_model_answers_a_held_back_question_through_the_server(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    data_file("gpt2.tiktoken")
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import read_state, save_checkpoint
    from gptkit.config import resolve_config
    from gptkit.serve import Server, ServeConfig, load_for_serving
    from gptkit.sft import DEFAULT_CHAT_TEMPLATE, prepare_chat, render
    from gptkit.train import train

    # the pattern: echo two words; the held-back pair is new, its words are not
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    random.Random(0).shuffle(pairs)
    held, train_pairs = pairs[0], pairs[1:51]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": _conv(a, b)}) + "\n" for a, b in train_pairs))
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)
    base = tmp_path / "base"
    save_checkpoint(base, 0, GPT(cfg), {"model_config": cfg.to_dict()})
    data = prepare_chat(chat, str(base), tmp_path / "data", block_size=39, val_fraction=0.04, log=lambda *a: None)

    run = tmp_path / "run"
    c, m = resolve_config(None, {k: str(v) for k, v in dict(
        data=data, out=run, init=base, batch_size=16, block_size=39, max_steps=150, warmup_steps=10, lr=3e-3,
        min_lr=3e-4, weight_decay=0.0, eval_interval=0, log_interval=50, sample_tokens=0, progress=False,
        dtype="float32", device="cpu").items()})
    res = train(c, m, log=lambda *a: None)
    assert res.final_val_loss < 1.0
    assert (run / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert read_state(sorted(run.glob("ckpt_*"))[-1])["chat_template"] == DEFAULT_CHAT_TEMPLATE

    model, tok, _ = load_for_serving(str(run), device="cpu")
    assert tok.chat_template.source == DEFAULT_CHAT_TEMPLATE  # the run carries its template to the server
    prompt, _ = render(DEFAULT_CHAT_TEMPLATE, _conv(*held, answer=False), add_generation_prompt=True,
                       eos_token="<|endoftext|>")
    want = f"{held[0]} {held[1]}"
    with Server(model, tok, "sft", config=ServeConfig(max_batch=4, batch_wait_s=0.01)) as s:
        status, out = _post(s.url + "/v1/completions", {"model": "sft", "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0})
        assert status == 200, out
        assert out["choices"][0]["text"] == want, out
        assert out["choices"][0]["finish_reason"] == "stop"  # it learned to end its turn with <|endoftext|>
        # the chat route renders the run's template itself (where the server has it)
        status, out = _post(s.url + "/v1/chat/completions", {"model": "sft", "messages": _conv(*held, answer=False),
                                                             "max_tokens": 8, "temperature": 0})
        if status != 404:
            assert status == 200, out
            assert out["choices"][0]["message"]["content"] == want, out
