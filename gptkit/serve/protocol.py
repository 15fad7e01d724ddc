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
from dataclasses import dataclass
from typing import Any

from gptkit.errors import GptkitError
from gptkit.generate import SamplingParams, prepare_prompt
from gptkit.inference import default_prompt_ids
from gptkit.serve.config import ServeConfig

MAX_BODY = 4 << 20  # bytes of JSON a request may send
MAX_STOP = 16  # stop strings a request may give


# ----------------------------------------------------------------------------------------------
# errors

class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict | None:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else None


class Overloaded(APIError):
    """No room for a request: the queue is full or the server is shutting down (503)."""

    def __init__(self, reason: str):
        super().__init__(503, f"the server is overloaded ({reason}); retry later", None, "overloaded")


def generation_failed(e: BaseException) -> APIError:
    """The error a client gets when the engine failed on its rows (a bug, not the client's fault)."""
    return APIError(500, f"generation failed: {e}", None, "internal_error")


def route_error(status: int, method: str, path: str, detail: str) -> APIError:
    """An HTTP-level error of the web framework (unknown route, wrong method) in OpenAI's shape."""
    msg = f"no route {method} {path}" if status == 404 else str(detail)
    return APIError(status, msg, None, {404: "not_found", 405: "method_not_allowed"}.get(status))


def check_api_key(authorization: str, api_key: str | None) -> None:
    """Raise a 401 unless the `Authorization` header carries `Bearer <api_key>` (any header when no key is set)."""
    if api_key is None:
        return
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key", None, "invalid_api_key")


def body_too_large() -> APIError:
    return APIError(400, f"the request body is larger than {MAX_BODY} bytes", None, "body_too_large")


def decode_json(raw: bytes) -> Any:
    """The request body's JSON (a 400 if it is not JSON)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


# ----------------------------------------------------------------------------------------------
# requests: OpenAI's fields -> rows for the engine

@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # token ids, one per prompt
    n: int
    params: list[SamplingParams]  # one per row (prompt-major: row = prompt * n + choice)
    stream: bool
    include_usage: bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# JSON types a field may have: (check, what the message says it must be)
INT = (_is_int, "an integer")
NUMBER = (_is_num, "a number")
BOOL = (lambda v: isinstance(v, bool), "true or false")
OBJECT = (lambda v: isinstance(v, dict), "an object")

# OpenAI's fields gptkit does not implement: refused rather than silently ignored (key -> accepted values)
UNSUPPORTED = (("echo", lambda v: v in (None, False)), ("suffix", lambda v: v is None),
               ("logprobs", lambda v: v in (None, 0)), ("logit_bias", lambda v: not v),
               ("presence_penalty", lambda v: v in (None, 0)), ("frequency_penalty", lambda v: v in (None, 0)))


def _field(body: dict, key: str, default, kind, *rules):
    """body[key], or `default` when it is absent or null, checked once: its JSON type (`kind`), then
    each rule (predicate, what the value must be). A failure is a 400 naming the field."""
    v = body.get(key)
    if v is None:
        v = default
    elif not kind[0](v):
        raise APIError(400, f"'{key}' must be {kind[1]}, got {json.dumps(v)[:80]}", key, "invalid_type")
    if v is not None:
        for ok, must in rules:
            if not ok(v):
                raise APIError(400, f"'{key}' must be {must}, got {v}", key, "invalid_value")
    return v


def parse_completion_request(body: Any, tokenizer, block_size: int, model_name: str,
                             config: ServeConfig) -> CompletionRequest:
    """Check an OpenAI /v1/completions body; raise APIError(400) naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(400, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    for key, ok in UNSUPPORTED:
        if not ok(body.get(key)):
            raise APIError(400, f"'{key}' is not supported by gptkit serve", key, "unsupported_parameter")

    limit = config.max_tokens_limit
    max_tokens = _field(body, "max_tokens", config.default_max_tokens, INT,
                        (lambda v: v >= 0, ">= 0"), (lambda v: v <= limit, f"<= {limit}"))
    temperature = _field(body, "temperature", 1.0, NUMBER, (lambda v: v >= 0, ">= 0"))
    top_p = _field(body, "top_p", 1.0, NUMBER, (lambda v: 0 < v <= 1, "in (0, 1]"))
    top_k = _field(body, "top_k", None, INT, (lambda v: v >= 0, ">= 0 (0 = off)"))  # extension, as in vLLM
    penalty = _field(body, "repetition_penalty", 1.0, NUMBER, (lambda v: v > 0, "> 0"))  # extension, as in vLLM
    n = _field(body, "n", 1, INT, (lambda v: v >= 1, ">= 1"))
    if _field(body, "best_of", n, INT) != n:
        raise APIError(400, "'best_of' other than n is not supported by gptkit serve", "best_of",
                       "unsupported_parameter")
    seed = _field(body, "seed", None, INT)
    stream = _field(body, "stream", False, BOOL)
    include_usage = bool(_field(body, "stream_options", {}, OBJECT).get("include_usage", False))
    stop = _parse_stop(body.get("stop"))

    prompts = _parse_prompts(body.get("prompt"), tokenizer)
    ids = []
    for i, p in enumerate(prompts):
        p = default_prompt_ids(tokenizer, p) if isinstance(p, str) else p
        try:
            ids.append(prepare_prompt(p, block_size, truncate=False, where="prompt"))
        except GptkitError as e:
            raise APIError(400, f"prompt {i}: {e.what}; {e.hint}" if len(prompts) > 1 else f"{e.what}; {e.hint}",
                           "prompt", "context_length_exceeded") from None
    rows = len(ids) * n
    if rows > config.max_batch:
        raise APIError(400, f"{len(ids)} prompt(s) x n={n} = {rows} completions, more than this server runs at once "
                       f"({config.max_batch})", "n", "invalid_value")
    # the fields were checked above, so SamplingParams.validate (the CLI's check) has nothing left to find
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_k=top_k or None,
                             top_p=float(top_p), repetition_penalty=float(penalty), stop=tuple(stop),
                             seed=None if seed is None else seed + j)
              for _ in ids for j in range(n)]
    return CompletionRequest(ids, n, params, stream, include_usage)


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

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text)
        except GptkitError as e:
            raise APIError(400, f"{e.what}; {e.hint}", "prompt", "invalid_value") from None


# ----------------------------------------------------------------------------------------------
# responses

def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


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


def models_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "gptkit"}]}
