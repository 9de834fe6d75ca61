"""vLLM model classes that serve the language model *inside* an InternVL checkpoint.

Each class is vLLM's own implementation of the LLM architecture; the only change is weight
loading: checkpoint names are mapped to plain causal-LM names and the vision tensors are
skipped. vLLM therefore reads the checkpoint's safetensors directly, with no second copy of
the weights on disk. Registered with vLLM by ``llm_server.engine.vllm_plugin``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from checkpoints.llm_weights import language_model_weight_name


class _InternVLLanguageWeights:
    """Mixin: feed only the language-model tensors, under their plain names."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renamed = (
            (name, tensor)
            for name, tensor in (
                (language_model_weight_name(original), tensor) for original, tensor in weights
            )
            if name is not None
        )
        return super().load_weights(renamed)  # type: ignore[misc]


class DvDQwen3ForCausalLM(_InternVLLanguageWeights, Qwen3ForCausalLM):
    pass


class DvDQwen3MoeForCausalLM(_InternVLLanguageWeights, Qwen3MoeForCausalLM):
    pass


class DvDQwen2ForCausalLM(_InternVLLanguageWeights, Qwen2ForCausalLM):
    pass


class DvDLlamaForCausalLM(_InternVLLanguageWeights, LlamaForCausalLM):
    pass


class DvDGptOssForCausalLM(_InternVLLanguageWeights, GptOssForCausalLM):
    pass
