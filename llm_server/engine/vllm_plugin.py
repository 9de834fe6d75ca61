"""vLLM general plugin (entry point ``vllm.general_plugins``): registers DvD's model classes.

vLLM loads general plugins in every process it starts (API, engine core, workers), so the
registration reaches the process that builds the model. Registration is lazy (by module
path), so importing this module imports nothing heavy.
"""

from __future__ import annotations

# LLM architecture inside InternVL3.5 checkpoints -> DvD class serving it from the checkpoint.
LANGUAGE_MODEL_CLASSES = {
    "Qwen3ForCausalLM": "DvDQwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "DvDQwen3MoeForCausalLM",
    "Qwen2ForCausalLM": "DvDQwen2ForCausalLM",
    "LlamaForCausalLM": "DvDLlamaForCausalLM",
    "GptOssForCausalLM": "DvDGptOssForCausalLM",
}

# For configs that name a model type but no architecture (transformers' text_config).
MODEL_TYPE_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for architecture, dvd_class in LANGUAGE_MODEL_CLASSES.items():
        if dvd_class not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(dvd_class, f"llm_server.engine.vllm_models:{dvd_class}")
        # vLLM adjusts its config for some architectures by name (GPT-OSS: the MXFP4 method
        # name, its CUDA-graph mode); ours are the same models under another name.
        if architecture in MODELS_CONFIG_MAP:
            MODELS_CONFIG_MAP.setdefault(dvd_class, MODELS_CONFIG_MAP[architecture])
