"""OpenAI's generation features for one request: ``response_format``, ``logprobs`` /
``top_logprobs``, ``logit_bias``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls``.

Each becomes what vLLM already implements (``SamplingParams``: structured outputs, logprobs,
logit bias) plus what the prompt and the reply need (the tools for the chat template, the
parser that reads calls back). Everything a client can get wrong is refused here with a 400
that names the field, before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_server.api.logprobs import TokenBytes
from llm_server.api.protocol import ChatCompletionRequest
from llm_server.api.structured import structured_outputs_for
from llm_server.api.tools import ToolCalling, ToolPlan
from llm_server.errors import BadRequest


@dataclass(frozen=True)
class OutputOptions:
    """What the reply carries besides text."""

    top_logprobs: int | None = None  # None: no logprobs; 0..20 alternatives per token
    tools: ToolPlan | None = None
    token_bytes: TokenBytes | None = None

    @property
    def parses_tool_calls(self) -> bool:
        return self.tools is not None and self.tools.parse


@dataclass(frozen=True)
class RequestFeatures:
    sampling: dict[str, Any]  # extra SamplingParams arguments
    template_tools: list[dict[str, Any]] | None
    output: OutputOptions
    constraint_source: str | None = None  # the request field a grammar comes from


class OpenAIFeatures:
    """Server-wide: the vocabulary size, the token-bytes table and the tool parser."""

    def __init__(self, tokenizer: Any, vocab_size: int, tool_parser: str) -> None:
        self.vocab_size = vocab_size
        self.token_bytes = TokenBytes(tokenizer)
        self.tools = ToolCalling(tokenizer, tool_parser)

    def resolve(self, request: ChatCompletionRequest) -> RequestFeatures:
        sampling: dict[str, Any] = {}
        top_logprobs = self._logprobs(request)
        if top_logprobs is not None:
            sampling["logprobs"] = top_logprobs
        if request.logit_bias:
            sampling["logit_bias"] = self._logit_bias(request.logit_bias)
        plan = self.tools.plan(request)
        constraint = structured_outputs_for(request.response_format)
        source = "response_format" if constraint is not None else None
        if plan is not None and plan.structural_tag is not None:
            if constraint is not None:
                raise BadRequest(
                    "response_format cannot be combined with constrained tool calls "
                    "(strict tools or parallel_tool_calls=false)",
                    param="response_format",
                )
            constraint, source = {"structural_tag": plan.structural_tag}, "tools"
        if constraint is not None:
            from vllm.sampling_params import StructuredOutputsParams

            sampling["structured_outputs"] = StructuredOutputsParams(**constraint)
        if plan is not None and plan.parse:
            # Some checkpoints mark their tool-call tags as special tokens: keep them in the
            # text, or the parser never sees a call.
            sampling["skip_special_tokens"] = False
        return RequestFeatures(
            sampling=sampling,
            template_tools=plan.template_tools if plan is not None else None,
            output=OutputOptions(
                top_logprobs=top_logprobs,
                tools=plan,
                token_bytes=self.token_bytes if top_logprobs is not None else None,
            ),
            constraint_source=source,
        )

    @staticmethod
    def _logprobs(request: ChatCompletionRequest) -> int | None:
        if not request.logprobs:
            if request.top_logprobs:
                raise BadRequest("top_logprobs needs logprobs=true", param="top_logprobs")
            return None
        return request.top_logprobs or 0

    def _logit_bias(self, biases: dict[str, float]) -> dict[int, float]:
        out: dict[int, float] = {}
        invalid = []
        for key, bias in biases.items():
            try:
                token_id = int(key)
            except ValueError:
                invalid.append(key)
                continue
            if not 0 <= token_id < self.vocab_size:
                invalid.append(key)
                continue
            out[token_id] = bias
        if invalid:
            raise BadRequest(
                f"logit_bias keys must be token ids in [0, {self.vocab_size}); "
                f"invalid: {', '.join(invalid[:10])}",
                param="logit_bias",
            )
        return out
