"""Chat templates: render a model's Jinja `chat_template` exactly as transformers'
`tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` does.

The environment follows transformers' (utils/chat_template_utils.py): an immutable sandbox,
trim_blocks and lstrip_blocks, the loop-controls extension, a `{% generation %}` block that renders
its body, a `tojson` filter that does not escape HTML (json.dumps with ensure_ascii=False),
the globals `raise_exception(message)` and `strftime_now(format)`, and the tokenizer's special
tokens (bos_token, eos_token, ...) as variables. Messages with None values lose those keys first,
as transformers does.

Where a template comes from: a model directory's `chat_template.jinja` (transformers 5), else
tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default"), else
a `--chat-template FILE` (`load_chat_template`). GPT-2 has none: `require_chat_template` refuses.
Generation stops at the end-of-turn tokens the template uses (`end_of_turn_tokens`); a tokenizer
whose vocabulary lacks them as single tokens stops on them as text (`chat_stops`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

ROLES = ("system", "user", "assistant", "tool")
# end-of-turn markers of the common templates (ChatML, Llama 3, Phi-3, Gemma, GPT-2-style, Llama 2)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
               "<|endoftext|>", "<|end_of_text|>", "</s>")


def _jinja2():
    """jinja2, an optional dependency: only chat templates need it."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise GptkitError("chat templates need the jinja2 package", "chat template",
                          "pip install 'gptkit[chat]' (jinja2>=3.1.6)") from None
    return jinja2


def _environment():
    """A Jinja environment like transformers': sandboxed, trim/lstrip blocks, loop controls."""
    jinja2 = _jinja2()
    ImmutableSandboxedEnvironment = jinja2.sandbox.ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text (for loss masks); here it
        only renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """namespace(...) that refuses underscore names (no reaching into Python internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for k in attrs:
                Namespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, k, v):
            Namespace._check(k)
            jinja2.utils.Namespace.__setitem__(self, k, v)

        @staticmethod
        def _check(k):
            if isinstance(k, str) and k.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {k!r} starts with an underscore")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class DictMaker:  # dict(...) and dict.fromkeys(...), without the type itself
        def __call__(self, *a, **k):
            return dict(*a, **k)

        def fromkeys(self, *a, **k):
            return dict.fromkeys(*a, **k)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=DictMaker(), namespace=Namespace)
    return env


def _plain(value: Any) -> Any:
    """What the template sees: plain JSON-like values only."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def validate_messages(messages: Any, where: str = "messages") -> list[dict]:
    """Messages must be a non-empty list of {role, content} with a role in ROLES; content a string
    (or a list of content parts, or absent for an assistant turn with tool_calls)."""
    if not isinstance(messages, list) or not messages:
        raise GptkitError("messages must be a non-empty list of {role, content}", where,
                          'e.g. [{"role": "user", "content": "Hello"}]')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GptkitError(f"message {i} is not an object", where, "each message is {role, content}")
        role = m.get("role")
        if role not in ROLES:
            raise GptkitError(f"message {i} has unknown role {role!r}", where, f"use one of {', '.join(ROLES)}")
        c = m.get("content")
        if not (isinstance(c, (str, list)) or (c is None and (m.get("tool_calls") or role == "assistant"))):
            raise GptkitError(f"message {i} has no text content", where, "give content as a string")
        out.append({k: v for k, v in m.items() if v is not None})  # transformers drops None values
    return out


class ChatTemplate:
    """A Jinja chat template plus the special-token variables it renders with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, where: str = "chat template"):
        jinja2 = _jinja2()
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.where = where
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise GptkitError(f"chat template does not parse: {e.message} (line {e.lineno})", where,
                              "fix the template's Jinja syntax") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text, as transformers' apply_chat_template(messages, add_generation_prompt,
        tokenize=False) renders it. An unknown role or a template that raises is a GptkitError."""
        jinja2 = _jinja2()
        messages = validate_messages(messages)
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._compiled.render(messages=_plain(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise GptkitError(f"the chat template raised: {e.message or e}", self.where,
                              "the conversation is not one this template accepts") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise GptkitError(f"the chat template failed: {type(e).__name__}: {e}", self.where,
                              "the conversation is not one this template accepts") from None

    def end_of_turn_tokens(self) -> list[str]:
        """The end-of-turn markers this template writes, eos included when the template uses it."""
        eos = self.special_tokens.get("eos_token")
        uses_eos = eos is not None and ("eos_token" in self.source or eos in self.source)
        found = [t for t in END_OF_TURN if t in self.source]
        return list(dict.fromkeys(([eos] if uses_eos else []) + found))


def _template_text(value, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or [{"name", "template"}] (the default one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise GptkitError(f"several chat templates ({', '.join(map(str, named))}) and none named default", where,
                          "give one with --chat-template FILE")
    raise GptkitError("chat_template is neither a string nor a list", where, "the file is damaged")


def special_tokens_of(tok) -> dict[str, str]:
    """The template variables bos_token, eos_token, ... of a gptkit tokenizer."""
    special = dict(getattr(tok, "special", None) or {})
    if not special and getattr(tok, "kind", None) == "gpt2":
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return special


def template_from_dir(d: str | Path, tok=None) -> ChatTemplate | None:
    """A model directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    d = Path(d)
    if (d / "chat_template.jinja").is_file():
        return load_chat_template(d / "chat_template.jinja", tok)
    cfg_file = d / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GptkitError(f"not valid JSON: {e}", cfg_file, "the file is damaged") from None
        text = _template_text(cfg.get("chat_template") if isinstance(cfg, dict) else None, str(cfg_file))
        if text is not None:
            return ChatTemplate(text, special_tokens_of(tok), str(cfg_file))
    return None


def load_chat_template(path: str | Path, tok=None) -> ChatTemplate:
    """`--chat-template FILE`: a Jinja file (e.g. chat_template.jinja), a tokenizer_config.json
    holding `chat_template`, or a directory with either. `tok` supplies the special tokens."""
    p = Path(path)
    if p.is_dir():
        t = template_from_dir(p, tok)
        if t is None:
            raise GptkitError("no chat template in directory", p,
                              "expected chat_template.jinja or tokenizer_config.json with chat_template")
        return t
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptkitError("chat template file not found", p, "give a .jinja file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GptkitError(f"cannot read chat template: {e}", p, "give a UTF-8 .jinja file") from None
    if p.suffix == ".json":
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptkitError(f"not valid JSON: {e}", p, "give a .jinja file or a tokenizer_config.json") from None
        text = _template_text(cfg.get("chat_template") if isinstance(cfg, dict) else None, str(p))
        if text is None:
            raise GptkitError("no chat_template key", p, "give a .jinja file or a tokenizer_config.json with one")
    return ChatTemplate(text, special_tokens_of(tok), str(p))


def require_chat_template(tok, where: str = "--model") -> ChatTemplate:
    """The tokenizer's chat template, or the clear refusal chat and /v1/chat/completions give."""
    t = getattr(tok, "chat_template", None)
    if t is None:
        raise GptkitError("the model has no chat template (GPT-2 and char models have none)", where,
                          "give one with --chat-template FILE (a Jinja file such as a chat_template.jinja)")
    return t


def chat_stops(tok, template: ChatTemplate | None = None) -> tuple[list[int], list[str]]:
    """What ends an assistant turn: (stop token ids, stop strings). Ids: the tokenizer's stop_ids
    (eos, generation_config's eos ids, end-of-turn tokens). Markers the template writes that are not
    single tokens of the vocabulary (a ChatML template on GPT-2) become stop strings."""
    template = template or getattr(tok, "chat_template", None)
    ids = list(getattr(tok, "stop_ids", []) or [])
    strings = []
    for t in (template.end_of_turn_tokens() if template else []):
        i = tok.token_to_id(t) if hasattr(tok, "token_to_id") else None
        if i is None:
            strings.append(t)
        elif i not in ids:
            ids.append(i)
    return ids, strings
