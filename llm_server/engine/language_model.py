"""The language engine: vLLM's ``AsyncLLM``, fed token ids plus visual embedding rows.

Prompts use vLLM's mixed prompt-embeds input: the text positions carry token ids (vLLM embeds
them with the model's own table, on the accelerator) and the image positions carry the rows
the vision service produced. The API process never holds the embedding table.

Prompts reach the engine as vLLM's rendered engine inputs (``Renderer.render_cmpl``), the
input path vLLM keeps; handing ``generate`` raw prompt dicts is deprecated there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

import torch

from checkpoints.spec import CheckpointSpec
from llm_server.engine.backbone import Backbone, backbone_of
from llm_server.engine.engine_args import iter_given
from llm_server.engine.model_files import language_model_config_dir
from llm_server.errors import BadRequest
from llm_server.prompt import ExpandedPrompt
from llm_server.settings import LLMSettings

logger = logging.getLogger(__name__)


def llm_dtype_from_checkpoint(requested: str, spec: CheckpointSpec) -> str:
    """``auto`` means the checkpoint's own dtype (vLLM's ``auto`` would turn float32 into
    bfloat16, which changes the tiny model's outputs)."""
    if requested != "auto":
        return requested
    name = spec.checkpoint_dtype.removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"


def cpu_kv_cache_size(settings: LLMSettings, given: Mapping[str, Any]) -> dict[str, int]:
    """vLLM's ``kv_cache_memory_bytes`` on CPU from ``--cpu-kv-cache-gib``, unless the command
    line gave it or ``VLLM_CPU_KVCACHE_SPACE`` is set (vLLM reads that variable itself, in
    whole GiB, and it wins). Without either, vLLM's CPU backend would size the cache from the
    host's free memory."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "kv_cache_memory_bytes" in given:
        return {}
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    return {"kv_cache_memory_bytes": int(settings.cpu_kv_cache_gib * 2**30)}


class LanguageEngine:
    """One vLLM engine serving the checkpoint's language model."""

    def __init__(self, llm: Any, model_name: str, backbone: Backbone) -> None:
        self.llm = llm
        self.model_name = model_name
        self.backbone = backbone
        model_config = llm.model_config
        self.max_model_len: int = int(model_config.max_model_len)
        self.dtype: torch.dtype = model_config.dtype
        self.hidden_size: int = int(model_config.get_hidden_size())
        # Rows of the output layer: the token ids logit_bias may name (>= the tokenizer's).
        self.vocab_size: int = int(model_config.get_vocab_size())
        # Sampling defaults the checkpoint's generation_config.json asks for (may be empty).
        self.default_sampling: dict[str, Any] = dict(model_config.get_diff_sampling_param())

    @classmethod
    def start(
        cls,
        spec: CheckpointSpec,
        settings: LLMSettings,
        model_name: str,
        cache_dir: Path,
        gpu_memory_utilization: float | None = None,
        engine_args: Mapping[str, Any] | None = None,
    ) -> LanguageEngine:
        """Start vLLM (spawns its engine process; takes tens of seconds). Blocking.
        ``gpu_memory_utilization`` overrides the setting (coupled mode leaves room for the
        vision encoder). ``engine_args``: vLLM engine arguments given on the command line
        (``AsyncEngineArgs`` fields that DvD neither sets nor refuses, see ``engine_args``)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        backbone = backbone_of(spec.text_config)
        logger.info("language model: %s", backbone.describe())
        config_dir = language_model_config_dir(spec, cache_dir)
        given = dict(engine_args or {})
        if given:
            logger.info("vLLM engine arguments: %s", ", ".join(iter_given(given)))
        given.update(cpu_kv_cache_size(settings, given))
        args = AsyncEngineArgs(
            **given,  # the rest keep vLLM's defaults (generation_config: auto, the checkpoint's)
            # What DvD sets (refused on the command line), then DvD's own settings.
            model=str(spec.path),
            hf_config_path=str(config_dir),
            tokenizer=str(spec.path),
            served_model_name=model_name,
            enable_prompt_embeds=True,
            dtype=llm_dtype_from_checkpoint(settings.dtype, spec),  # type: ignore[arg-type]
            max_model_len=settings.max_model_len,  # type: ignore[arg-type]
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization or settings.gpu_memory_utilization,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            enable_prefix_caching=settings.prefix_caching,
        )
        llm = AsyncLLM.from_engine_args(args)
        engine = cls(llm, model_name, backbone)
        # vLLM turns it off by itself for some models and platforms: say what it decided.
        prefix_caching = bool(llm.vllm_config.cache_config.enable_prefix_caching)
        if settings.prefix_caching and not prefix_caching:
            logger.warning("vLLM turned prefix caching off for this model on this platform")
        logger.info(
            "language engine ready: %s, %s, %s, context %d tokens, prefix caching %s",
            model_name,
            backbone.model_type,
            str(engine.dtype).removeprefix("torch."),
            engine.max_model_len,
            "on" if prefix_caching else "off",
        )
        return engine

    def build_prompt(
        self, prompt: ExpandedPrompt, visual_rows: list[torch.Tensor]
    ) -> dict[str, Any]:
        """vLLM's engine input for the prompt: token ids everywhere, embedding rows where
        ``is_text`` is False (a text-only prompt is plain token ids, the path ``vllm serve``
        takes). Blocking (copies the rows): run it off the event loop."""
        request_prompt: dict[str, Any]
        if not prompt.image_spans:
            request_prompt = {"prompt_token_ids": prompt.token_ids}
        else:
            embeds = torch.zeros(len(prompt.token_ids), self.hidden_size, dtype=self.dtype)
            for (start, end), rows in zip(prompt.image_spans, visual_rows, strict=True):
                if rows.shape != (end - start, self.hidden_size):
                    raise ValueError(
                        f"image rows {tuple(rows.shape)} do not fit span {start}:{end}"
                    )
                embeds[start:end] = rows.to(self.dtype)
            request_prompt = {
                "prompt_embeds": embeds,
                "prompt_token_ids": prompt.token_ids,
                "prompt_is_token_ids": prompt.is_text,
            }
        return self.render(request_prompt)

    def render(self, request_prompt: dict[str, Any]) -> dict[str, Any]:
        """A token or embeddings prompt -> vLLM's engine input (``{"type": ...}``), checked by
        vLLM's renderer as ``vllm serve`` checks its own."""
        from vllm.exceptions import VLLMClientError

        renderer = self.llm.renderer
        try:
            (engine_input,) = renderer.render_cmpl(
                [request_prompt], renderer.default_cmpl_tok_params
            )
        except VLLMClientError as exc:
            raise BadRequest(str(exc), param="messages") from exc
        return dict(engine_input)

    def check_sampling_params(self, sampling_params: Any, constraint: str | None = None) -> None:
        """vLLM's own checks of the parameters against this model (token ids in range, a
        structured-output constraint its grammar backend accepts, ...); 400 on failure, naming
        the parameter (``constraint``: the request field a grammar came from). Blocking (builds
        the grammar): run it off the event loop."""
        from vllm.exceptions import VLLMClientError

        llm = self.llm
        try:
            sampling_params.verify(
                llm.model_config,
                llm.vllm_config.speculative_config,
                llm.vllm_config.structured_outputs_config,
                llm.renderer.tokenizer,
            )
        except Exception as exc:  # vLLM's validation errors, or a grammar it cannot build
            if not isinstance(exc, VLLMClientError | ValueError):
                logger.info("sampling parameters refused: %r", exc)
            parameter = getattr(exc, "parameter", None) or constraint
            raise BadRequest(f"invalid request: {exc}", param=parameter) from exc

    async def generate(
        self, prompt: dict[str, Any], sampling_params: Any, request_id: str
    ) -> AsyncGenerator[Any, None]:
        """vLLM's output stream for one request; closing it aborts the request."""
        stream = self.llm.generate(prompt, sampling_params, request_id=request_id)
        async with contextlib.aclosing(stream) as outputs:
            async for output in outputs:
                yield output

    @property
    def errored(self) -> bool:
        return bool(self.llm.errored)

    def shutdown(self) -> None:
        self.llm.shutdown()
        # AsyncLLM's finaliser shuts down once more when the object is collected, which for a
        # server is at interpreter exit, when that second call fails on torn-down modules and
        # prints a traceback. It has nothing left to do: make it a no-op for this instance.
        self.llm.shutdown = lambda *args, **kwargs: None
