"""The OpenAI API's request bodies and errors, as the coordinator's HTTP API (coordinator/http_api.py) takes
them: pydantic models of /v1/completions and /v1/chat/completions, what each refuses as not implemented,
their sampling parameters, and the error every refusal becomes (``{"error": {"message", "type", "param",
"code"}}``)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from engine.sampling import SamplingParams


class ApiError(Exception):
    """An error for the client, rendered in the OpenAI format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------------ request bodies
class Sampling(BaseModel):
    """Fields both generation endpoints share. Unknown fields are ignored (clients send ``user``,
    ``metadata`` and the like); known ones that are not implemented are refused in ``unsupported``."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # Extras (vLLM's names): what the engine's sampler offers beyond the OpenAI fields.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None

    def unsupported(self) -> list[str]:
        found = []
        if self.n not in (None, 1):
            found.append("n (only 1)")
        if self.presence_penalty or self.frequency_penalty:
            found.append("presence_penalty/frequency_penalty (use repetition_penalty)")
        if self.logit_bias:
            found.append("logit_bias")
        return found

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                              min_p=self.min_p or 0.0,
                              repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                              max_tokens=max_tokens, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                              seed=self.seed, ignore_eos=bool(self.ignore_eos))

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        found = super().unsupported()
        if self.logprobs is not None:
            found.append("logprobs")
        if self.best_of not in (None, 1):
            found.append("best_of")
        if self.suffix:
            found.append("suffix")
        return found


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(p.text or "" for p in self.content)


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        found = super().unsupported()
        if self.logprobs:
            found.append("logprobs")
        if self.tools:
            found.append("tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            found.append("response_format")
        return found


def check_unicode(value: Any, where: str = "") -> None:
    """JSON may escape lone UTF-16 surrogates (``"\\ud800"``), which no tokenizer can take: refuse them (400)
    before anything tokenizes the request."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where or 'a string'} is not valid Unicode (a lone surrogate)",
                           param=where.split(".")[0] or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_unicode(v, f"{where}[{i}]")
