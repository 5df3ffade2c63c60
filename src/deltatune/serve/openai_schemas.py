"""Request bodies of the OpenAI-compatible routes, with the fields clients send.

Fields the server cannot honour (``n`` > 1, penalties, log-probabilities) are accepted at their
neutral values, so tools that always send them work, and refused with a 400 otherwise.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltatune.serve.sampling import SamplingParams
from deltatune.serve.schemas import MAX_CHARS, AdapterName

Stop = Annotated[str, Field(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat requests share: the adapter, sampling, stopping, streaming."""

    model_config = ConfigDict(extra="forbid")

    model: AdapterName
    max_tokens: int | None = Field(None, ge=1, le=4096, description="new tokens at most (default 16)")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample from the k most probable tokens; 0: all (an extension)")
    seed: int | None = Field(None, description="the same seed gives the same text")
    stop: Stop | list[Stop] | None = Field(None, description="up to 4 strings; the text ends before the first")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        return value

    def sampling(self, default_max_tokens: int = 16) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=tuple(stop))


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_CHARS)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_CHARS)]], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False
    logprobs: None = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool fields ...: the template sees role and content

    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(max_length=MAX_CHARS)]


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096, description="the newer name of max_tokens")
    logprobs: Literal[False] | None = None

    def sampling(self, default_max_tokens: int = 16) -> SamplingParams:
        return super().sampling(self.max_completion_tokens or default_max_tokens)  # max_tokens wins if both
