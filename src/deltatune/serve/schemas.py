"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI docs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from deltatune.core.routing import BASE_ADAPTER

MAX_INPUTS = 64  # texts per classify request
MAX_CHARS = 20_000  # characters per text or prompt; longer token sequences are truncated anyway
NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"


def _encodable(text: str) -> str:
    """Refuse text with lone surrogates (``"\\ud800"`` in JSON): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate escape such as \\ud800)") from None
    return text


Text = Annotated[str, Field(max_length=MAX_CHARS), AfterValidator(_encodable)]
#: the adapter a request names; longer than NAME_PATTERN allows, as start-up adapters are named freely
AdapterName = Annotated[str, Field(min_length=1, max_length=128,
                                   description=f'adapter name, or "{BASE_ADAPTER}" for the base model')]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class ClassifyRequest(_Strict):
    adapter: AdapterName
    inputs: list[Text] = Field(min_length=1, max_length=MAX_INPUTS, description="texts to classify")


class Classification(BaseModel):
    label: int = Field(description="the most probable class index")
    label_name: str | None = Field(None, description="its name from the model's id2label (a trained or merged "
                                                     "model's labels); null when the model has only LABEL_i")
    probabilities: list[float] = Field(description="softmax over the classes")


class ClassifyResponse(BaseModel):
    adapter: str
    outputs: list[Classification] = Field(description="one per input, in input order")


class GenerateRequest(_Strict):
    adapter: AdapterName
    prompt: Text = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1, le=512, description="greedy decoding stops after this many tokens")


class GenerateResponse(BaseModel):
    adapter: str
    text: str = Field(description="the generated continuation, without the prompt")
    tokens: list[int] = Field(description="its token ids")


class LoadRequest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="name to serve the adapter under")
    path: str = Field(min_length=1, max_length=1024, description="adapter folder, relative to --adapter-root")


class LoadResponse(BaseModel):
    loaded: str
    evicted: list[str] = Field(description="adapters unloaded to stay within --max-adapters (least recently used)")


class AdapterInfo(BaseModel):
    name: str
    pinned: bool = Field(description="given at start-up: never evicted")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    max_adapters: int
    base: str = Field(BASE_ADAPTER, description="the name that selects the base model without an adapter")


class Error(BaseModel):
    detail: str | list = Field(description="what was wrong (validation errors: one entry per problem)")
