"""`gptkit chat`: an interactive chat in the terminal, over the model's chat template.

Each turn renders the whole conversation as transformers' `apply_chat_template(messages,
add_generation_prompt=True)` does (chat_template.py), encodes it without adding special tokens (as
apply_chat_template's tokenize=True does: the template writes bos itself), and streams the reply
until the template's end-of-turn token (or its text, where the vocabulary lacks it as one token).
The reply joins the history as the assistant's message. `/reset` clears the history (the system
message stays), `/exit` or end of input ends the chat, Ctrl-C stops a reply (the turn is dropped).
Turns that no longer fit the context drop the oldest exchanges first.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable

from gptkit.chat_template import chat_stops, load_chat_template, require_chat_template
from gptkit.errors import GptkitError
from gptkit.generate import Generation, SamplingParams
from gptkit.inference import OPTION_NAMES, check_sampling_args, load_for_inference

HELP_TEXT = "type a message; /reset clears the history, /exit (or Ctrl-D) ends the chat"


class ChatSession:
    """A conversation with a model: `reply(text, write)` streams the assistant's answer to `write`
    and returns it; the history grows by the user's message and the reply."""

    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None, template=None):
        self.model, self.tok = model, tokenizer
        self.template = template or require_chat_template(tokenizer)
        ids, strings = chat_stops(tokenizer, self.template)
        self.params = replace(params, stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *ids])),
                              stop=tuple(dict.fromkeys([*params.stop, *strings])))
        self.system = system
        self.turn = 0  # seeds of sampled turns: seed, seed + 1, ...
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation's tokens with the assistant's turn opened (transformers' rendering)."""
        return self.tok.encode(self.template.render(messages, add_generation_prompt=True), add_special_tokens=False)

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """Drop the oldest exchanges (never the system message or the new user message) until the
        prompt leaves room for at least one new token in the context."""
        limit = self.model.config.block_size - 1
        head = 1 if messages and messages[0]["role"] == "system" else 0
        while True:
            ids = self.prompt_ids(messages)
            if len(ids) <= limit:
                return messages, ids
            if len(messages) - head <= 1:
                raise GptkitError(f"the message takes {len(ids)} tokens with the template, over the context of "
                                  f"{self.model.config.block_size}", "chat", "send a shorter message")
            # an exchange at a time, so user and assistant still alternate (templates check that)
            n = 2 if messages[head]["role"] == "user" and messages[head + 1]["role"] == "assistant" else 1
            messages = messages[:head] + messages[head + n:]

    def reply(self, text: str, write: Callable[[str], object] = lambda s: None) -> str:
        messages, ids = self._fit(self.history + [{"role": "user", "content": text}])
        sp = self.params
        if sp.seed is not None:
            sp = replace(sp, seed=sp.seed + self.turn)
        sp = replace(sp, max_new_tokens=min(sp.max_new_tokens, self.model.config.block_size - len(ids)))
        pieces = []
        for event in Generation(self.model, [ids], sp, self.tok):
            if event.text:
                pieces.append(event.text)
                write(event.text)
        answer = "".join(pieces)
        self.history = messages + [{"role": "assistant", "content": answer}]
        self.turn += 1
        return answer


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], object] | None = None,
              prompt: str = "> ") -> list[dict]:
    """Read messages with `read(prompt)` until /exit or EOFError, answering each; returns the history.
    A message the template refuses (or one too long) prints one `error:` line and the chat goes on."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    while True:
        try:
            line = read(prompt)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if text == "/help":
            write(HELP_TEXT + "\n")
            continue
        try:
            session.reply(line.rstrip("\n"), write)
        except GptkitError as e:
            write(e.line() + "\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat; the turn is forgotten
            write("\n(interrupted)\n")
            continue
        write("\n")
    return session.history


def run_chat(model_path: str, vocab: str | None = None, chat_template: str | None = None, system: str | None = None,
             max_new_tokens: int = 512, temperature: float = 0.7, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, repetition_penalty: float = 1.0, device: str = "auto", dtype: str = "float32",
             read: Callable[[str], str] = input, write: Callable[[str], object] | None = None) -> list[dict]:
    """`gptkit chat`: load the model, its tokenizer and chat template (or `chat_template`, a file),
    then chat until /exit. Returns the final history."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, 1)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed)
    sp.validate(OPTION_NAMES)
    model, tok = load_for_inference(model_path, vocab, device, dtype)
    if chat_template:
        tok.chat_template = load_chat_template(chat_template, tok)
    session = ChatSession(model, tok, sp, system)
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if sys.stdin.isatty() and read is input:
        write(HELP_TEXT + "\n")
    return chat_loop(session, read, write)
