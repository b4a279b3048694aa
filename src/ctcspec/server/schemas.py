"""The OpenAI request bodies `ctcspec serve` accepts, validated by pydantic.

A field OpenAI defines that ctcspec cannot honour exactly (n > 1, logprobs, tools, penalties that transformers'
generate has no processor for) is refused with a 400 naming it, never ignored; a field OpenAI does not define is
refused too, as OpenAI refuses it ("unrecognized request argument"). Fields that only label a request (user,
metadata, store, service_tier) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from ctcspec.decoding import MIN_TEMPERATURE

MAX_STOPS = 16
MAX_STOP_CHARS = 256


def _unicode(text: str) -> str:
    """JSON can spell a lone surrogate (\\ud800), which is no Unicode text and no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StopText = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        """The message as a chat template takes it: OpenAI's `developer` role is the template's `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


def _refuse(value, default, message: str):
    if value not in (None, default):
        raise ValueError(message)
    return value


class GenerationFields(BaseModel):
    """What both endpoints share: the model, length, decoding and streaming fields."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # labels only: accepted, ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        return _refuse(n, 1, "n > 1 is not supported: ctcspec returns one choice per request")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_openai_penalties(cls, value):
        return _refuse(value, 0, "not supported (transformers' generate has no such processor); use "
                                 "repetition_penalty")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value):
        return _refuse(value or None, None, "logit_bias is not supported")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value and value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _usage_needs_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def length(self) -> int | None:
        """The most tokens to generate (None: what the context leaves)."""
        return self.max_tokens

    def sampling_settings(self) -> dict:
        """The `model.generate` settings these fields ask for: greedy when temperature is 0 or left out (as
        `ctcspec generate`), else sampling at that temperature; top_p, top_k and min_p shape sampling only (with
        greedy they are ignored, as OpenAI ignores them). Left out, they are the model's generation_config's, as in
        `model.generate` (transformers' default top_k is 50); top_k -1 or 0 means no top-k, as in vLLM."""
        settings = {"do_sample": bool(self.temperature)}
        if self.temperature:
            settings["temperature"] = self.temperature
            shaping = {"top_p": self.top_p, "top_k": None if self.top_k is None else max(self.top_k, 0),
                       "min_p": self.min_p}
            settings.update({key: value for key, value in shaping.items() if value is not None})
        if self.repetition_penalty is not None:
            settings["repetition_penalty"] = self.repetition_penalty
        return settings

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        return _refuse(value or None, None, "logprobs are not supported")

    @field_validator("tools", "tool_choice")
    @classmethod
    def _no_tools(cls, value):
        return _refuse(value if value not in ([], "none") else None, None, "tools are not supported")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        return _refuse((value or {}).get("type", "text"), "text", "only the text response format is supported")

    @model_validator(mode="after")
    def _one_length(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree: give one")
        return self

    def length(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        return _refuse(value or None, None, "echo is not supported")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        return _refuse(value or None, None, "suffix is not supported")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        return _refuse(value, 1, "best_of > 1 is not supported")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        return _refuse(value, None, "logprobs are not supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ValueError("one prompt per request is supported (got a batch of "
                                 f"{len(prompt)})")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt
