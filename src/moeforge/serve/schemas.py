"""OpenAI's request and response bodies for ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/models``, vLLM's for ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``, and OpenAI's error
body ``{"error": {"message", "type", "param", "code"}}``.

Requests are strict as OpenAI's are: JSON types must match and unknown arguments are errors. Arguments
this server cannot honour (``presence_penalty``, ``logit_bias``, ``suffix``, ``best_of`` …) are rejected
rather than silently ignored; ``top_k`` and ``repetition_penalty`` are extensions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from moeforge.serve.sampling import SamplingParams

__all__ = [
    "MAX_CHOICES",
    "MAX_LOGPROBS",
    "MAX_SCORING_CHOICES",
    "MAX_STOP",
    "APIError",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobs",
    "ChatMessage",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ModelCard",
    "ModelList",
    "TokenLogprob",
    "TokenizeRequest",
    "TokenizeResponse",
    "TokenizerInfo",
    "TopLogprob",
    "Usage",
    "usage",
    "validation_message",
]

MAX_CHOICES = 16  # choices (prompts × n) per request
MAX_SCORING_CHOICES = 256  # choices per echo request that generates at most one token (lm-eval's batches)
MAX_LOGPROBS = 20  # most likely tokens per position (OpenAI's limit)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; lm-eval adds the EOS to a task's own list)


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=dict(headers or {}))


# ---- requests ---------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> str:
    """``text``, or ValueError when it holds a lone surrogate: JSON allows a ``\\ud800`` escape alone, but
    it is no character, so such text cannot be encoded as UTF-8 (nor tokenized)."""
    if m := _SURROGATE.search(text):
        raise ValueError(
            f"is not valid Unicode: a lone surrogate \\u{ord(m.group()):04x} at character {m.start()} "
            "(\\ud800-\\udfff escapes must come in high-low pairs)"
        )
    return text


class _Strict(BaseModel):
    # JSON types must match (no "5" for 5) and unknown arguments are errors, as with OpenAI
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share, with OpenAI's names; ``top_k`` and ``repetition_penalty`` are
    extensions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            if any(s == "" for s in v):
                raise ValueError("stop strings must not be empty")
            for s in v:
                if isinstance(s, str):
                    _unicode(s)
        return v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v:  # rejected rather than silently ignored
            hint = "" if info.field_name == "logit_bias" else "; repetition_penalty > 1 discourages repeats"
            raise ValueError(f"is not supported by this server (only 0 or null){hint}")
        return v

    def sampling(self, max_tokens: int, logprobs: bool, top_logprobs: int = 0) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=self.stop,
            seed=self.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids or token-id lists.
    ``echo`` puts the prompt before the completion (and its tokens' log-probabilities before the
    completion's, with ``logprobs``); ``max_tokens`` 0 with ``echo`` scores the prompt only."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = None  # the chosen tokens' log-probabilities and this many most likely tokens
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        ok = isinstance(v, str) or (
            isinstance(v, list) and (all(isinstance(p, str) for p in v) or ids(v) or all(ids(p) for p in v))
        )
        if not ok:
            raise ValueError(
                "must be a string, a list of strings, a list of token ids or a list of such lists"
            )
        if v == [] or v == "":
            raise ValueError("is empty; send at least one prompt with at least one token")
        for text in [v] if isinstance(v, str) else v:
            if isinstance(text, str):
                _unicode(text)
        return v

    @field_validator("suffix")
    @classmethod
    def _not_supported(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported by this server")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(
                f"must be in 0..{MAX_LOGPROBS}: the number of most likely tokens to return at each "
                "position besides the chosen one"
            )
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("other than 1 is not supported; use n for several completions")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(_Strict):
    """One chat turn; ``content`` is a string or OpenAI's list of ``{"type": "text", "text": …}`` parts.
    A ``developer`` turn (OpenAI's newer name for system) is a system turn."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None  # accepted and ignored

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(
                        f"part {i} must be {{'type': 'text', 'text': str}}; got {kind!r} (only text)"
                    )
                texts.append(part["text"])
            v = "".join(texts)
        if not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return _unicode(v)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"must be in 0..{MAX_LOGPROBS}: the most likely tokens to return per position")
        return v

    @field_validator("messages", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if v == []:
            raise ValueError("is empty; a chat needs at least one message")
        return v


# ---- responses --------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability (None for an echoed prompt's first
    token, which has no context), the most likely tokens there as ``{text: logprob}`` (None likewise)
    and the character offset of its text in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A completion, or (with ``usage`` None) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeforge"
    max_model_len: int  # the context length in tokens, prompt and completion together (as vLLM reports)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's): a ``prompt`` as ``/v1/completions`` reads it, or ``messages`` as
    ``/v1/chat/completions`` renders them (the server's default system turn included). ``model`` defaults
    to the first served model."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt: True (vLLM's default); messages: False
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @field_validator("prompt")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return None if v is None else _unicode(v)

    @field_validator("messages", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if v == []:
            raise ValueError("is empty; a chat needs at least one message")
        return v


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's): the text of token ids, special tokens included."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """``GET /tokenizer_info``: the served tokenizer's configuration in ``tokenizer_config.json``'s terms
    (what vLLM serves and lm-eval's remote tokenizer reads), with the special tokens' ids."""

    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    model_max_length: int
    max_model_len: int
    vocab_size: int
    add_bos_token: bool = False
    add_eos_token: bool = False
    clean_up_tokenization_spaces: bool = False
    chat_template: str | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    total = prompt_tokens + completion_tokens
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


# ---- errors -----------------------------------------------------------------------------------------------


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message for pydantic errors (at most three) and the first error's parameter."""
    parts, params = [], []
    for e in errors[:3]:
        loc = [str(p) for p in e["loc"] if p != "body"]
        where = ".".join(loc)
        if e["type"] == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        if e["type"] == "extra_forbidden":
            parts.append(f"unrecognized request argument: {where}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = (
                ""
                if isinstance(got, (dict, list)) or got is None or e["type"] == "missing"
                else f" (got {_clip(repr(got))})"
            )
            parts.append(f"{where}: {msg}{shown}" if where else msg)
        params.append(where or None)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, params[0] if params else None
