"""The checkpoint's language backbone, as the service reports it (``/v1/models``, start-up log).

Read from the checkpoint's LLM config alone (``llm_config`` or ``text_config``); there is no
flag for it. InternVL3.5 ships three families: dense Qwen3, Qwen3-MoE (routed experts) and
GPT-OSS (routed experts, attention sinks, sliding-window attention on every other layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_server.engine.model_files import language_model_architecture


@dataclass(frozen=True)
class Backbone:
    """What kind of language model the checkpoint holds."""

    model_type: str  # e.g. "qwen3_moe": the name /v1/models reports
    architecture: str  # e.g. "Qwen3MoeForCausalLM"
    experts: int | None = None  # routed experts per MoE layer
    experts_per_token: int | None = None
    sliding_window: int | None = None  # tokens, on the layers that use it
    attention_sinks: bool = False
    quantization: str | None = None  # e.g. "mxfp4"

    def describe(self) -> str:
        """One line for the start-up log, e.g. ``qwen3_moe (Qwen3MoeForCausalLM, 128 experts,
        top 8)``."""
        details = [self.architecture]
        if self.experts:
            details.append(f"{self.experts} experts, top {self.experts_per_token}")
        if self.sliding_window:
            details.append(f"sliding window {self.sliding_window}")
        if self.attention_sinks:
            details.append("attention sinks")
        if self.quantization:
            details.append(f"{self.quantization} weights")
        return f"{self.model_type} ({', '.join(details)})"


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def backbone_of(config: dict[str, Any]) -> Backbone:
    """The backbone described by a checkpoint's LLM config (``CheckpointSpec.text_config``);
    raises ``CheckpointError`` if its architecture cannot be told."""
    architecture = language_model_architecture(config)
    model_type = str(config.get("model_type") or architecture)
    # Qwen3-MoE configs say num_experts, GPT-OSS and transformers 5 say num_local_experts.
    experts = _int_or_none(config.get("num_experts") or config.get("num_local_experts"))
    layer_types = config.get("layer_types") or []
    sliding = model_type == "gpt_oss" or "sliding_attention" in layer_types
    quantization = config.get("quantization_config")
    return Backbone(
        model_type=model_type,
        architecture=architecture,
        experts=experts,
        experts_per_token=_int_or_none(config.get("num_experts_per_tok")) if experts else None,
        sliding_window=_int_or_none(config.get("sliding_window")) if sliding else None,
        attention_sinks=model_type == "gpt_oss",
        quantization=str(quantization.get("quant_method"))
        if isinstance(quantization, dict)
        else None,
    )
