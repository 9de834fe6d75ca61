"""Start the language service's app from a ``dvd-llm-server`` command line (its lifespan:
settings, vLLM's engine, the vision client; no HTTP), print the configuration of the running
vLLM engine as one JSON line, and stop. ``test_engine_args`` runs it to check that vLLM's
engine arguments reach the engine."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from llm_server.app import create_app
from llm_server.engine.engine_args import parse_llm_command_line


def engine_config(vllm_config: Any) -> dict[str, Any]:
    """The values of the running engine that the test checks, from vLLM's own config."""
    cache, scheduler = vllm_config.cache_config, vllm_config.scheduler_config
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return {
        "kv_cache_dtype": str(cache.cache_dtype),
        "block_size": cache.block_size,
        "kv_cache_memory_bytes": cache.kv_cache_memory_bytes,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "enable_chunked_prefill": scheduler.enable_chunked_prefill,
        "max_num_seqs": scheduler.max_num_seqs,
        "quantization": model.quantization,
        "max_model_len": model.max_model_len,
        "dtype": str(model.dtype).removeprefix("torch."),
        "seed": model.seed,
        "enable_prompt_embeds": model.enable_prompt_embeds,
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "data_parallel_size": parallel.data_parallel_size,
    }


async def probe(argv: list[str]) -> dict[str, Any]:
    settings, engine_args = parse_llm_command_line(argv)
    app = create_app(settings, engine_args=engine_args)
    async with app.router.lifespan_context(app):
        return engine_config(app.state.chat.engine.llm.vllm_config)


if __name__ == "__main__":
    print("ENGINE_CONFIG " + json.dumps(asyncio.run(probe(sys.argv[1:]))), flush=True)
