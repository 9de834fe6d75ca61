"""OpenAI's generation features for one request: ``response_format``, ``logprobs`` /
``top_logprobs``, ``logit_bias``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls``.

Each becomes what vLLM already implements (``SamplingParams``: structured outputs, logprobs,
logit bias) plus what the prompt and the reply need (the tools for the chat template, the
parser that reads calls back). Everything a client can get wrong is refused here with a 400
that names the field, before any work is done.

The backbone decides how answers are read: GPT-OSS answers in harmony messages, read by vLLM's
harmony parser (``harmony.py``) with its ``openai`` tool parser; the Qwen3 family answers in
plain text, with ``hermes`` tool-call blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_server.api.harmony import HarmonyVocabulary, harmony_structured_outputs
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
    harmony: HarmonyVocabulary | None = None  # set for GPT-OSS: answers are harmony messages

    @property
    def parses_tool_calls(self) -> bool:
        return self.tools is not None and self.tools.parse


@dataclass(frozen=True)
class RequestFeatures:
    sampling: dict[str, Any]  # extra SamplingParams arguments
    template_tools: list[dict[str, Any]] | None
    output: OutputOptions
    constraint_source: str | None = None  # the request field a grammar comes from


HARMONY_BACKBONES = frozenset({"gpt_oss"})


def tool_parser_for(setting: str, backbone: str) -> str:
    """The vLLM tool parser for ``--tool-parser`` on ``backbone``: ``auto`` picks the family's
    (``openai`` for GPT-OSS's harmony calls, ``hermes`` for the Qwen3 family); a harmony model
    takes no other, and no other model takes ``openai``."""
    harmony = backbone in HARMONY_BACKBONES
    if setting == "auto":
        return "openai" if harmony else "hermes"
    if harmony and setting != "openai":
        raise ValueError(
            f"--tool-parser {setting!r} cannot read a {backbone} model's answers, which are "
            "harmony messages; use 'auto' or 'openai'"
        )
    if not harmony and setting == "openai":
        raise ValueError(
            f"--tool-parser 'openai' reads GPT-OSS's harmony messages, not a {backbone} model's "
            "answers; use 'auto' or the family's parser"
        )
    return setting


class OpenAIFeatures:
    """Server-wide: the vocabulary size, the token-bytes table, the tool parser and, for
    GPT-OSS, harmony's reading of answers."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, tool_parser: str, backbone: str = "qwen3"
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.token_bytes = TokenBytes(tokenizer)
        self.harmony = HarmonyVocabulary(tokenizer) if backbone in HARMONY_BACKBONES else None
        self.tools = ToolCalling(tokenizer, tool_parser_for(tool_parser, backbone))

    def resolve(self, request: ChatCompletionRequest) -> RequestFeatures:
        sampling: dict[str, Any] = {}
        top_logprobs = self._logprobs(request)
        if top_logprobs is not None:
            sampling["logprobs"] = top_logprobs
        if request.logit_bias:
            sampling["logit_bias"] = self.token_biases(request.logit_bias)
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
        if constraint is not None and source == "response_format" and self.harmony is not None:
            sampling["structured_outputs"] = harmony_structured_outputs(constraint, self.tokenizer)
        elif constraint is not None:
            from vllm.sampling_params import StructuredOutputsParams

            sampling["structured_outputs"] = StructuredOutputsParams(**constraint)
        if plan is not None and plan.parse and self.harmony is None:
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
                harmony=self.harmony,
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

    def token_biases(self, biases: dict[str, float]) -> dict[int, float]:
        """``logit_bias`` keyed by token id; 400 unless every key is a token id in range."""
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
