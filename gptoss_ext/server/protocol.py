"""What the OpenAI-compatible routes share: the error shape, ids, reading a request body field by
field (every bad value is an HTTP 400 that names the field), sampling parameters, stop strings."""

from __future__ import annotations

import math
import time
import uuid

from ..engine.scheduler import SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Body:
    """A request's JSON object, read field by field: each getter checks the type and range and
    raises an ApiError naming the field."""

    def __init__(self, data):
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_body")
        self.data = data

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def get(self, name: str, default=None):
        v = self.data.get(name)
        return default if v is None else v

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad(name, f"{name} must be true or false, got {v!r}")
        return v

    def string(self, name: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise bad(name, f"{name} must be a string, got {type(v).__name__}")
        if choices and v not in choices:
            raise bad(name, f"{name} must be one of {', '.join(choices)}, got {v!r}")
        return v

    def number(self, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
        v = self.data.get(name)
        if v is None:
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise bad(name, f"{name} must be {kind}, got {v!r}")
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            lo_s = f"({lo:g}" if lo_open else f"[{lo:g}"
            hi_s = "inf)" if hi == math.inf else f"{hi:g}]"
            raise bad(name, f"{name} must be in {lo_s}, {hi_s}, got {v!r}")
        return v

    def choices_and_streaming(self) -> tuple[int, bool, bool]:
        """n, stream, and stream_options.include_usage (only allowed with stream)."""
        n = self.number("n", 1, 1, 128, integer=True)
        stream = self.boolean("stream")
        so = self.data.get("stream_options")
        if so is not None and (not isinstance(so, dict) or not stream):
            raise bad("stream_options", "stream_options must be an object and is only allowed with stream=true")
        return n, stream, bool(so and so.get("include_usage"))

    def unsupported(self, name: str, ok=(None, False, 0, 0.0, 1), why: str = "") -> None:
        """A field this server does not implement: accepted only at its no-op value."""
        v = self.data.get(name)
        if not any(v is o or (type(v) is type(o) and v == o) for o in ok):
            raise bad(name, f"{name}={v!r} is not supported by this server{why}", code="unsupported_parameter")


def stop_strings(body: Body, name: str = "stop") -> list[str]:
    v = body.data.get(name)
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad(name, f"{name} must be a string or a list of strings")
    if len(items) > 4:
        raise bad(name, f"{name} takes at most 4 sequences, got {len(items)}")
    if any(s == "" for s in items):
        raise bad(name, f"{name} sequences must not be empty")
    return list(items)


def sampling(body: Body, *, max_tokens: int | None, prompt_len: int, max_model_len: int, stop_ids,
             max_tokens_param: str, prompt_param: str, choice: int = 0) -> SamplingParams:
    """The engine's SamplingParams from the body's temperature / top_p / top_k / seed and the
    request's token limit (checked against the context left after the prompt)."""
    left = max_model_len - prompt_len
    if left < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context holds {max_model_len} "
                       "(at least one must be left to generate)", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = left
    elif max_tokens > left:
        raise ApiError(400, f"{max_tokens_param}={max_tokens} and the prompt's {prompt_len} tokens exceed this "
                       f"model's context of {max_model_len} tokens (at most {left} can be generated)",
                       param=max_tokens_param, code="context_length_exceeded")
    seed = body.number("seed", None, -2**63, 2**63 - 1, integer=True)
    top_k = body.number("top_k", 0, -1, 1 << 30, integer=True)
    ignore = body.boolean("ignore_eos")          # vLLM's extension: benchmarks generate max_tokens every time
    return SamplingParams(max_tokens=max_tokens, ignore_stops=ignore,
                          temperature=float(body.number("temperature", 1.0, 0.0, 2.0)),
                          top_p=float(body.number("top_p", 1.0, 0.0, 1.0, lo_open=True)),
                          top_k=0 if top_k == -1 else top_k,
                          seed=None if seed is None else seed + choice,
                          stop_token_ids=tuple(stop_ids))


def common_checks(body: Body) -> None:
    """Fields of the OpenAI APIs that this server accepts only at their neutral values."""
    for name in ("frequency_penalty", "presence_penalty"):
        body.number(name, 0.0, -2.0, 2.0)
        body.unsupported(name, ok=(None, 0, 0.0))
    if body.data.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported by this server", code="unsupported_parameter")


class StopStrings:
    """Stop sequences on streamed text: `feed(piece)` returns what may be shown now (text that could
    still begin a stop sequence is held back) and whether a stop sequence was reached (the text
    is cut before it)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return piece
        self.buf += piece
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.hit = self.buf[:cut], "", True
            return out
        keep = self.hold
        out, self.buf = (self.buf[:-keep], self.buf[-keep:]) if keep and len(self.buf) > keep else (
            ("", self.buf) if keep else (self.buf, ""))
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out
