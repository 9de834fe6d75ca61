"""OpenAI completions wire models (``/v1/completions``: text prompts in, text out). Pydantic
only."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from llm_server.api.protocol import LOGIT_BIAS_CAP, STOP_SEQUENCES_CAP, StreamOptions, Usage

# Hard caps while the body is validated (as in ``protocol.py``): validation stops at the first
# item past one. The service's own limits (settings) are tighter.
PROMPTS_CAP = 4_096
PROMPT_TOKENS_CAP = 1 << 20  # token ids in one token-id prompt

TokenIds = Annotated[
    list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=PROMPT_TOKENS_CAP)
]


def _prompt_kind(value: Any) -> str:
    """Which form of prompt ``value`` is, from its first element: the one form it is then
    validated as. Tried in turn, a list of 100,000 strings made 200,000 errors (each string
    not a token id, twice) that took 0.9 s to build and report."""
    if isinstance(value, str):
        return "text"
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, str):
        return "texts"
    if isinstance(first, list):
        return "token_lists"
    return "tokens"


Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Field(min_length=1, max_length=PROMPTS_CAP), Tag("texts")]
    | Annotated[TokenIds, Tag("tokens")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=PROMPTS_CAP), Tag("token_lists")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(BaseModel):
    """OpenAI's fields, plus vLLM's and DvD's extensions (``top_k``, ``min_tokens``,
    ``ignore_eos``, ``return_token_ids``). Unknown fields are ignored; known OpenAI features
    this server does not implement are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: Prompt = Field(
        description="a string, a list of strings, a list of token ids or a list of such lists"
    )
    suffix: str | None = None
    max_tokens: int | None = Field(
        16, ge=0, description="tokens per choice (OpenAI's default: 16); 0 only with echo"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stop: str | Annotated[list[str], Field(max_length=STOP_SEQUENCES_CAP)] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=LOGIT_BIAS_CAP
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = None
    # vLLM's and DvD's extensions.
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one entry each: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        return prompt  # type: ignore[return-value]


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability, the most likely tokens
    (the sampled one included) and its character offset in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # DvD/vLLM extension (return_token_ids)
    prompt_token_ids: list[int] | None = None

    def wire(self) -> dict[str, Any]:
        # OpenAI sends "logprobs" and "finish_reason" even when null.
        data = self.model_dump(exclude_none=True)
        data.setdefault("logprobs", None)
        data.setdefault("finish_reason", None)
        return data


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    def wire(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        data["choices"] = [choice.wire() for choice in self.choices]
        return data
