"""What crosses the wire of `gptkit serve`: OpenAI's request fields, its error shape and its response shapes.

- Requests: `parse_completion_request` turns a /v1/completions body into token ids and one
  `SamplingParams` per row. Each field is checked here, once, and a bad one is a 400 that names it.
- Errors: `APIError` is any error answered as `{"error": {"message", "type", "param", "code"}}`; the
  helpers below map the other failures (a full queue, a failed generation, an unknown route, a
  missing key) onto it, so the status, type and code of every error are decided in this module.
- Responses: the JSON of a completion, of a streamed chunk and of the model list.

Nothing here needs FastAPI: the app (`gptkit.serve.app`) reads the bytes and writes what this builds.
"""

import hmac
import json
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from gptkit.chat_template import chat_stops, require_chat_template
from gptkit.errors import GptkitError
from gptkit.generate import SamplingParams, prepare_prompt
from gptkit.inference import default_prompt_ids
from gptkit.serve.config import ServeConfig

MAX_BODY = 4 << 20  # bytes of JSON a request may send
MAX_STOP = 16  # stop strings a request may give
MAX_PROMPTS = 4096  # prompts in one request (they queue behind max_rows_per_request running rows)


# ----------------------------------------------------------------------------------------------
# errors

class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 503: "server_error", 500: "server_error"}
    RETRY_AFTER_S = 1  # what a 503 tells the client to wait

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status == 503:
            return {"Retry-After": str(self.RETRY_AFTER_S)}
        return None


class Overloaded(APIError):
    """No room for a request: the queue is full (503)."""

    def __init__(self, reason: str):
        super().__init__(503, f"the server is overloaded ({reason}); retry later", None, "overloaded")


class ShuttingDown(APIError):
    """The server is shutting down: it admits nothing new and ends what still runs after the grace period (503)."""

    def __init__(self, what: str = "the server is shutting down"):
        super().__init__(503, f"{what}; retry on another server or later", None, "shutting_down")


def api_error(e: BaseException) -> APIError:
    """The one place that maps a failure onto OpenAI's error shape: an APIError stays what it is; input
    that Python's JSON or integer parsing refuses (too deep, too many digits) is a 400; anything else
    is a bug of the server, a 500 that says so."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (ValueError, RecursionError, UnicodeDecodeError)):
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        return APIError(400, f"the request body is not valid JSON: {what}", None, "invalid_json")
    if isinstance(e, GptkitError):
        return APIError(400, f"{e.what}; {e.hint}", e.where, "invalid_value")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "internal_error")


def generation_failed(e: BaseException) -> APIError:
    """The error a client gets when the engine failed on its rows (see `api_error`)."""
    return api_error(e)


def route_error(status: int, method: str, path: str, detail: str) -> APIError:
    """An HTTP-level error of the web framework (unknown route, wrong method) in OpenAI's shape."""
    msg = f"no route {method} {path}" if status == 404 else str(detail)
    return APIError(status, msg, None, {404: "not_found", 405: "method_not_allowed"}.get(status))


def check_api_key(authorization: bytes | str, api_key: str | None) -> None:
    """Raise a 401 unless the `Authorization` header carries `Bearer <api_key>` (any header when no key
    is set). The header's raw bytes are compared with the key's UTF-8 bytes, so a non-ASCII key works
    when the client sends it as UTF-8 (as curl and browsers do)."""
    if api_key is None:
        return
    if isinstance(authorization, str):  # as an ASGI framework decodes it: latin-1, byte for byte
        authorization = authorization.encode("latin-1", errors="replace")
    scheme, _, given = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
    if not hmac.compare_digest(given.strip(), api_key.encode("utf-8")):
        raise APIError(401, "incorrect API key", None, "invalid_api_key")


def body_too_large() -> APIError:
    return APIError(400, f"the request body is larger than {MAX_BODY} bytes", None, "body_too_large")


def decode_json(raw: bytes) -> Any:
    """The request body's JSON (a 400 if it is not JSON, including integers of more digits than Python
    converts and nesting deeper than its recursion limit)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise api_error(e) from None


# ----------------------------------------------------------------------------------------------
# requests: OpenAI's fields -> rows for the engine

@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # token ids, one per prompt
    n: int
    params: list[SamplingParams]  # one per row (prompt-major: row = prompt * n + choice)
    stream: bool
    include_usage: bool
    echo: bool = False  # the prompt comes first in each choice's text (and logprobs)
    logprobs: int | None = None  # OpenAI's legacy logprobs: top-N alternatives per token (None: off)
    texts: list | None = None  # each prompt as the client gave it (str), or None for token ids


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A JSON number that is finite (Python's json accepts NaN and Infinity; huge ints are finite)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def _shower():
    r = reprlib.Repr()  # a short, bounded rendering of any JSON value for messages (even a deep or huge one)
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlong = 2, 60, 60, 4, 4, 40
    return r.repr


_show = _shower()


# JSON types a field may have: (check, what the message says it must be)
INT = (_is_int, "an integer")
NUMBER = (_is_num, "a finite number")
BOOL = (lambda v: isinstance(v, bool), "true or false")
OBJECT = (lambda v: isinstance(v, dict), "an object")

# OpenAI's fields gptkit does not implement: refused rather than silently ignored (key -> accepted values)
UNSUPPORTED = (("suffix", lambda v: v is None),)
MAX_LOGPROBS = 5  # OpenAI's legacy limit on `logprobs`
MAX_LOGIT_BIAS = 1024  # entries in logit_bias

GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as vLLM's _SAMPLING_EPS: logits / 1e-40 overflow
SEED_LIMIT = 2 ** 63  # seeds are int64 (torch.Generator.manual_seed), and row j uses seed + j

# The sampling fields, checked the same way for every endpoint: key -> (default, JSON kind, rules,
# SamplingParams field). A new field is one more line here.
SAMPLING_FIELDS = {
    "temperature": (1.0, NUMBER, [(lambda v: 0 <= v <= 2, "in [0, 2], as OpenAI allows")], "temperature"),
    "top_p": (1.0, NUMBER, [(lambda v: 0 < v <= 1, "in (0, 1]")], "top_p"),
    "top_k": (None, INT, [(lambda v: v >= 0, ">= 0 (0 = off)")], "top_k"),  # an extension, as in vLLM
    # an extension, as in vLLM; bounded so that logits / penalty stays finite
    "repetition_penalty": (1.0, NUMBER, [(lambda v: 0.01 <= v <= 100, "in [0.01, 100]")], "repetition_penalty"),
    "presence_penalty": (0.0, NUMBER, [(lambda v: -2 <= v <= 2, "in [-2, 2]")], "presence_penalty"),
    "frequency_penalty": (0.0, NUMBER, [(lambda v: -2 <= v <= 2, "in [-2, 2]")], "frequency_penalty"),
}


def sampling_fields(body: dict, vocab_size: int) -> dict:
    """The SamplingParams keyword arguments of the fields in SAMPLING_FIELDS and of logit_bias (each
    checked, or a 400)."""
    out = {"logit_bias": _parse_logit_bias(body.get("logit_bias"), vocab_size)}
    for key, (default, kind, rules, name) in SAMPLING_FIELDS.items():
        v = _field(body, key, default, kind, *rules)
        out[name] = float(v) if isinstance(v, (int, float)) and kind is NUMBER else v
    if out["temperature"] < GREEDY_BELOW:
        out["temperature"] = 0.0
    out["top_k"] = out["top_k"] or None
    return out


def _field(body: dict, key: str, default, kind, *rules):
    """body[key], or `default` when it is absent or null, checked once: its JSON type (`kind`), then
    each rule (predicate, what the value must be). A failure is a 400 naming the field."""
    v = body.get(key)
    if v is None:
        v = default
    elif not kind[0](v):
        raise APIError(400, f"'{key}' must be {kind[1]}, got {_show(v)}", key, "invalid_type")
    if v is not None:
        for ok, must in rules:
            if not ok(v):
                raise APIError(400, f"'{key}' must be {must}, got {_show(v)}", key, "invalid_value")
    return v


def parse_completion_request(body: Any, tokenizer, block_size: int, model_name: str,
                             config: ServeConfig) -> CompletionRequest:
    """Check an OpenAI /v1/completions body; raise APIError(400) naming the bad field.

    Everything that needs no tokenizer is checked first (fields, rows, the token budget, a prompt
    too long to fit whatever its tokens), so an oversized request costs no tokenization; the app
    runs this off the event loop."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{_show(model)}' does not exist; this server serves '{model_name}'",
                       "model", "model_not_found")  # OpenAI answers an unknown model with 404
    for key, ok in UNSUPPORTED:
        if not ok(body.get(key)):
            raise APIError(400, f"'{key}' is not supported by gptkit serve", key, "unsupported_parameter")

    limit = config.max_tokens_limit
    max_tokens = _field(body, "max_tokens", None, INT,
                        (lambda v: v >= 0, ">= 0"), (lambda v: v <= limit, f"<= {limit}"))
    sampling = sampling_fields(body, tokenizer.vocab_size)
    n = _field(body, "n", 1, INT, (lambda v: v >= 1, ">= 1"))
    if _field(body, "best_of", n, INT) != n:
        raise APIError(400, "'best_of' other than n is not supported by gptkit serve", "best_of",
                       "unsupported_parameter")
    seed = _field(body, "seed", None, INT,
                  (lambda v: -SEED_LIMIT <= v and v + n <= SEED_LIMIT, f"in [-2**63, 2**63 - n] (n = {n})"))
    stream = _field(body, "stream", False, BOOL)
    options = _field(body, "stream_options", {}, OBJECT)
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be true or false", "stream_options", "invalid_type")
    stop = _parse_stop(body.get("stop"))
    echo = _field(body, "echo", False, BOOL)
    logprobs = _field(body, "logprobs", None, INT, (lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"))
    if echo and stream:  # the prompt's text and logprobs are not streamed (documented in the README)
        raise APIError(400, "'echo' with 'stream' is not supported by gptkit serve; send it without 'stream'", "echo",
                       "unsupported_parameter")

    prompts = _parse_prompts(body.get("prompt"), tokenizer)
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"{len(prompts)} prompts, more than one request may send ({MAX_PROMPTS})", "prompt",
                       "invalid_value")
    # a request's rows beyond max_rows_per_request wait for its own rows to finish (a long prompt list,
    # as lm-evaluation-harness sends, queues); only one prompt's n must fit at once
    rows = n
    if n > config.max_rows_per_request:
        raise APIError(400, f"n={n} completions of one prompt, more than one request may ask for at once on this "
                       f"server ({config.max_rows_per_request})", "n", "invalid_value")
    budget = config.request_token_budget
    if max_tokens is not None and rows * max_tokens > budget:
        raise APIError(400, f"n={rows} completion(s) x max_tokens={max_tokens} = {rows * max_tokens} tokens, more "
                       f"than one prompt may ask for on this server ({budget})", "max_tokens", "invalid_value")
    room = block_size - 1
    per_token = _max_token_bytes(tokenizer)
    for i, p in enumerate(prompts):  # a cheap lower bound on the tokens before tokenizing
        if isinstance(p, str) and len(p) > room * per_token:
            raise APIError(400, f"{_which(i, prompts)}has at least {len(p) // per_token} tokens, more than the "
                           f"model's context ({block_size})", "prompt", "context_length_exceeded")

    ids = []
    for i, p in enumerate(prompts):
        p = default_prompt_ids(tokenizer, p) if isinstance(p, str) else p
        try:
            ids.append(prepare_prompt(p, block_size, truncate=False, where="prompt"))
        except GptkitError as e:
            raise APIError(400, f"{_which(i, prompts)}{e.what}; {e.hint}", "prompt", "context_length_exceeded") from None
    longest = max(len(p) for p in ids)
    if max_tokens is None:  # OpenAI's default, cut to what fits in the context
        max_tokens = max(1, min(config.default_max_tokens, block_size - longest))
        if rows * max_tokens > budget:
            max_tokens = max(1, budget // rows)
    if longest + max_tokens > block_size:  # as OpenAI and vLLM answer, rather than slide the window
        raise APIError(400, f"{_which(ids.index(max(ids, key=len)), ids)}has {longest} tokens and max_tokens is "
                       f"{max_tokens}: {longest + max_tokens} tokens, more than the model's context ({block_size}); "
                       f"lower max_tokens to at most {block_size - longest}", "max_tokens", "context_length_exceeded")
    # the fields were checked above, so SamplingParams.validate (the CLI's check) has nothing left to find
    params = [SamplingParams(max_new_tokens=max_tokens, stop=tuple(stop), seed=None if seed is None else seed + j,
                             **sampling)
              for _ in ids for j in range(n)]
    if logprobs is not None:
        for p in params:
            p.logprobs = logprobs
    return CompletionRequest(ids, n, params, stream, include_usage, echo, logprobs,
                             [p if isinstance(p, str) else None for p in prompts])


CHAT_UNSUPPORTED = (("logprobs", lambda v: v in (None, False)), ("top_logprobs", lambda v: v in (None, 0)),
                    ("tools", lambda v: not v), ("tool_choice", lambda v: v in (None, "none")),
                    ("response_format", lambda v: v is None or v == {"type": "text"}))


def parse_chat_request(body: Any, tokenizer, block_size: int, model_name: str,
                       config: ServeConfig) -> CompletionRequest:
    """Check an OpenAI /v1/chat/completions body: the messages rendered by the model's chat template
    as transformers' apply_chat_template(messages, add_generation_prompt=True) renders them, then
    tokenized as it does (no special tokens added: the template writes them), and the other fields
    checked as /v1/completions checks them. Generation also stops at the template's end of turn.
    No template, an unknown role or a template that raises is a 400."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    for key, ok in CHAT_UNSUPPORTED:
        if not ok(body.get(key)):
            raise APIError(400, f"'{key}' is not supported by gptkit serve's chat", key, "unsupported_parameter")
    tok = getattr(tokenizer, "_tok", tokenizer)
    try:
        template = require_chat_template(tok, "the served model")
    except GptkitError as e:
        raise APIError(400, f"{e.what}; {e.hint} when starting gptkit serve", "messages", "no_chat_template") from None
    try:
        text = template.render(body.get("messages"), add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    except GptkitError as e:
        raise APIError(400, f"{e.what}; {e.hint}", "messages", "invalid_value") from None
    dropped = ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
               "response_format", "echo", "suffix")  # chat's own fields, checked above, or none of chat's
    inner = {k: v for k, v in body.items() if k not in dropped}
    inner["prompt"] = ids or [tokenizer.eot if tokenizer.eot is not None else 0]
    if inner.get("max_tokens") is None:
        inner["max_tokens"] = body.get("max_completion_tokens")
    n = body.get("n") if _is_int(body.get("n")) and body["n"] > 0 else 1
    if inner["max_tokens"] is None:  # OpenAI's chat default: as long as the context allows
        inner["max_tokens"] = max(1, min(block_size - len(ids), config.max_tokens_limit,
                                         config.request_token_budget // n))
    req = parse_completion_request(inner, tokenizer, block_size, model_name, config)
    stop_ids, stop_strings = chat_stops(tok, template)
    for p in req.params:
        p.stop = tuple(dict.fromkeys((*p.stop, *stop_strings)))
        p.stop_token_ids = tuple(dict.fromkeys((*p.stop_token_ids, *stop_ids)))
    return req


def _parse_logit_bias(bias, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise APIError(400, f"'logit_bias' must be an object mapping token ids to numbers, got {_show(bias)}",
                       "logit_bias", "invalid_type")
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}", "logit_bias",
                       "invalid_value")
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 9 and int(k) < vocab_size):
            raise APIError(400, f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {_show(k)}",
                           "logit_bias", "invalid_value")
        if not (_is_num(v) and -100 <= v <= 100):
            raise APIError(400, f"'logit_bias' values must be numbers in [-100, 100], got {_show(v)}", "logit_bias",
                           "invalid_value")
        out[int(k)] = float(v)
    return out or None


def _which(i: int, prompts: list) -> str:
    return f"prompt {i} " if len(prompts) > 1 else "the prompt "


def _max_token_bytes(tokenizer) -> int:
    """The most UTF-8 characters one token can stand for (1 if the tokenizer cannot say): a prompt of
    more than (context x this) characters cannot fit, whatever its tokens."""
    tok = getattr(tokenizer, "_tok", tokenizer)
    cached = getattr(tok, "_gptkit_max_token_bytes", None)
    if cached is None:
        cached = 1
        tb = getattr(tok, "token_bytes", None)
        if tb is not None:
            try:
                cached = max(len(tb(i)) for i in range(tokenizer.vocab_size))
            except Exception:  # a tokenizer with holes in its ids: no bound beyond the body size
                cached = MAX_BODY
        elif not hasattr(tok, "chars"):  # an unknown tokenizer: no bound beyond the body size
            cached = MAX_BODY
        try:
            tok._gptkit_max_token_bytes = cached
        except AttributeError:
            pass
    return cached


def _parse_stop(stop) -> list[str]:
    """OpenAI's `stop`: absent, a string or a list of strings."""
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' may hold at most {MAX_STOP} strings, got {len(stop)}", "stop", "invalid_value")
    return stop


def _parse_prompts(prompt, tokenizer) -> list:
    """OpenAI's prompt forms: str, [str], [int] (one tokenized prompt) or [[int]]."""
    vocab = tokenizer.vocab_size

    def tokens(p: list) -> list[int]:
        if not all(_is_int(t) and 0 <= t < vocab for t in p):
            raise APIError(400, f"token ids must be integers in [0, {vocab})", "prompt", "invalid_value")
        return p

    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(p) for p in prompt):
            return [tokens(prompt)]
        if all(isinstance(p, list) and p for p in prompt):
            return [tokens(p) for p in prompt]
    raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt", "invalid_type")


class _SafeTokenizer:
    """A tokenizer whose encode() failures (e.g. a character outside a char model's vocabulary) are 400s."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens)
        except GptkitError as e:
            raise APIError(400, f"{e.what}; {e.hint}", "prompt", "invalid_value") from None


# ----------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints (what lm-evaluation-harness's `tokenizer_backend=remote` calls)

def _body_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def tokenize(body: Any, tokenizer, block_size: int) -> dict:
    """POST /tokenize {prompt, add_special_tokens} -> {count, max_model_len, tokens}. Special-token
    text (GPT-2's <|endoftext|>) becomes its id, as Hugging Face tokenizers (and so vLLM) encode it."""
    body = _body_object(body)
    text = body.get("prompt")
    if not isinstance(text, str):
        raise APIError(400, "'prompt' must be a string", "prompt", "invalid_type")
    add_special = _field(body, "add_special_tokens", True, BOOL)
    tok = getattr(tokenizer, "_tok", tokenizer)
    try:
        if getattr(tok, "enc", None) is not None:  # tiktoken (GPT-2): no bos is ever added, as in HF's GPT-2
            ids = tok.enc.encode(text, allowed_special="all")
        else:
            ids = tok.encode(text, add_special_tokens=add_special)
    except GptkitError as e:
        raise APIError(400, f"{e.what}; {e.hint}", "prompt", "invalid_value") from None
    return {"count": len(ids), "max_model_len": block_size, "tokens": ids, "token_strs": None}


def detokenize(body: Any, tokenizer) -> dict:
    """POST /detokenize {tokens} -> {prompt}."""
    ids = _body_object(body).get("tokens")
    vocab = tokenizer.vocab_size
    if not (isinstance(ids, list) and all(_is_int(t) and 0 <= t < vocab for t in ids)):
        raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens", "invalid_value")
    return {"prompt": tokenizer.decode(ids)}


def tokenizer_info(tokenizer, block_size: int) -> dict:
    """GET /tokenizer_info: the special tokens (lm-eval reads eos_token, bos_token, pad_token), the
    context length and the chat template's source (null when the model has none)."""
    tok = getattr(tokenizer, "_tok", tokenizer)
    special = dict(getattr(tok, "special", None) or {})
    if not special and getattr(tok, "enc", None) is not None:  # GPT-2, as its tokenizer_config.json says
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    template = getattr(tok, "chat_template", None)
    return {"tokenizer_class": type(tok).__name__, "eos_token": special.get("eos_token"),
            "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
            "unk_token": special.get("unk_token"), "model_max_length": block_size,
            "vocab_size": tokenizer.vocab_size, "chat_template": getattr(template, "source", template)}


# ----------------------------------------------------------------------------------------------
# responses

def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def token_text(tokenizer, t: int) -> str:
    """One token as text (a token that ends inside a UTF-8 character shows the replacement character)."""
    return tokenizer.decode([t])


def legacy_logprobs(tokenizer, ids: list[int], token_logprobs: list, tops: list, offset: int = 0) -> dict:
    """OpenAI's legacy logprobs object for tokens `ids`: {tokens, token_logprobs, top_logprobs,
    text_offset}. `tops[i]` is a list of (id, logprob) (None stays null); the token itself is always
    among its position's alternatives, as OpenAI returns it. Offsets count characters from `offset`."""
    tokens = [token_text(tokenizer, t) for t in ids]
    top_out, offsets = [], []
    for t, s, lp, top in zip(ids, tokens, token_logprobs, tops):
        offsets.append(offset)
        offset += len(s)
        if top is None:
            top_out.append(None)
            continue
        d = {token_text(tokenizer, i): v for i, v in top}
        d.setdefault(s, lp)
        top_out.append(d)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_out, "text_offset": offsets}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": None}


def chat_response(rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    """A whole /v1/chat/completions answer."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], include_usage: bool,
               usage: dict | None = None) -> dict:
    """One streamed piece of a chat answer: choices carry a `delta` (see `chat_delta`)."""
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if include_usage:
        d["usage"] = usage
    return d


def chat_delta(index: int, text: str, finish_reason: str | None, first: bool) -> dict:
    """A streamed chat choice: the row's first chunk names the role, as OpenAI's do."""
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def completion_response(rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    """A whole /v1/completions answer."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], include_usage: bool,
                     usage: dict | None = None) -> dict:
    """One streamed piece of a /v1/completions answer. With `stream_options.include_usage` every
    chunk has a `usage` key, null but in the last one (no choices), as OpenAI sends it."""
    d = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if include_usage:
        d["usage"] = usage
    return d


def models_list(model_name: str, created: int, chat_template: bool = False) -> dict:
    return {"object": "list", "data": [model_card(model_name, created, chat_template=chat_template)]}


def model_card(model_name: str, created: int, asked: str | None = None, chat_template: bool = False) -> dict:
    """`GET /v1/models/{id}`: the model, or a 404 for another id. `chat_template` (an extension): whether
    /v1/chat/completions is available (the playground shows its chat mode then)."""
    if asked is not None and asked != model_name:
        raise APIError(404, f"the model '{asked[:200]}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    return {"id": model_name, "object": "model", "created": created, "owned_by": "gptkit",
            "chat_template": chat_template}
