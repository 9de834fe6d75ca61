"""Chat completions: messages + images -> vision embeddings + prompt -> vLLM -> OpenAI replies.

Per request: fetch the image bytes, then in parallel (a) send the images to the image encoder
and (b) render and tokenize the chat; widen each image placeholder to the number of visual
tokens the encoder reports; hand vLLM the token ids plus the visual rows; stream tokens back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from llm_server import metrics
from llm_server.api.admission import Admission
from llm_server.api.choices import ChoiceOutput
from llm_server.api.features import OpenAIFeatures, OutputOptions
from llm_server.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    Delta,
    ImagePart,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
    VisionSummary,
)
from llm_server.engine.language_model import LanguageEngine
from llm_server.errors import (
    APIError,
    BadRequest,
    ContextLengthExceeded,
    EngineUnavailable,
    ModelNotFound,
    TooManyImages,
)
from llm_server.images import ImageLoader
from llm_server.prompt import ExpandedPrompt, PromptBuilder, TokenizedPrompt, expand_prompt
from llm_server.settings import LLMSettings
from llm_server.vision.base import EncodeOptions, ImageEncoder, ImageInput, VisualEmbedding

logger = logging.getLogger(__name__)


@dataclass
class PreparedChat:
    """Everything vLLM needs for one request, validated."""

    request_id: str
    created: int
    engine_prompt: dict[str, Any]
    sampling_params: Any
    num_prompt_tokens: int
    num_image_tokens: int
    n: int
    arrived: float  # perf_counter() when the request arrived
    vision: VisionSummary | None = None
    vision_tokens_saved: int = 0
    output: OutputOptions = field(default_factory=OutputOptions)


def _vision_summary(visuals: list[VisualEmbedding]) -> VisionSummary | None:
    if not visuals:
        return None
    return VisionSummary(
        images=len(visuals),
        tiles=sum(len(v.tokens_per_tile) for v in visuals),
        compressed_tiles=sum(v.num_compressed_tiles for v in visuals),
        image_tokens=sum(v.num_visual_tokens for v in visuals),
        vir=visuals[0].vir or "unavailable",
    )


class ChatService:
    """The logic behind ``/v1/chat/completions`` and ``/v1/models`` (no HTTP objects here)."""

    def __init__(
        self,
        engine: LanguageEngine,
        encoder: ImageEncoder,
        prompts: PromptBuilder,
        images: ImageLoader,
        settings: LLMSettings,
    ) -> None:
        self.engine = engine
        self.encoder = encoder
        self.prompts = prompts
        self.images = images
        self.settings = settings
        self.features = OpenAIFeatures(
            prompts.tokenizer, engine.vocab_size, settings.tool_parser, engine.backbone.model_type
        )
        self.model_name = engine.model_name
        self.created = int(time.time())
        # Callers hold a slot (``admission.slot()``) around prepare + complete/stream.
        self.admission = Admission(settings.max_concurrent_requests)

    def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=self.model_name,
                    created=self.created,
                    max_model_len=self.engine.max_model_len,
                    backbone=self.engine.backbone.model_type,
                )
            ]
        )

    # ---- preparation ---------------------------------------------------------------------

    def _validate(self, request: ChatCompletionRequest) -> list[ImagePart]:
        if request.model != self.model_name:
            raise ModelNotFound(
                f"The model {request.model!r} does not exist; "
                f"this server serves {self.model_name!r}.",
                param="model",
            )
        feature = request.unsupported_feature()
        if feature:
            raise BadRequest(f"{feature} is not supported by this server", param=feature)
        if request.n > self.settings.max_n:
            raise BadRequest(
                f"n={request.n} exceeds this server's limit of {self.settings.max_n}", param="n"
            )
        image_parts = [
            part
            for message in request.messages
            if isinstance(message.content, list)
            for part in message.content
            if isinstance(part, ImagePart)
        ]
        if len(image_parts) > self.settings.max_images_per_request:
            limit = self.settings.max_images_per_request
            raise TooManyImages(
                f"{len(image_parts)} images in one request; the limit is {limit}",
                param="messages",
            )
        return image_parts

    async def _load_images(self, parts: list[ImagePart]) -> list[ImageInput]:
        async def load(index: int, part: ImagePart) -> ImageInput:
            try:
                data = await self.images.load(part.image_url.url)
            except APIError as exc:
                exc.message = f"image {index}: {exc.message}"
                raise
            max_tiles = 1 if part.image_url.detail == "low" else None
            return ImageInput(data=data, max_tiles=max_tiles)

        return list(await asyncio.gather(*(load(i, p) for i, p in enumerate(parts))))

    def _sampling_params(
        self, request: ChatCompletionRequest, max_tokens: int, features: dict[str, Any]
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        defaults = self.engine.default_sampling

        def pick(name: str, value: Any, fallback: Any) -> Any:
            return value if value is not None else defaults.get(name, fallback)

        try:
            return SamplingParams(
                n=request.n,
                temperature=pick("temperature", request.temperature, 1.0),
                top_p=pick("top_p", request.top_p, 1.0),
                top_k=pick("top_k", request.top_k, 0),
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=defaults.get("repetition_penalty", 1.0),
                max_tokens=max_tokens,
                min_tokens=min(request.min_tokens, max_tokens),
                stop=request.stop_sequences or None,
                seed=request.seed,
                output_kind=RequestOutputKind.DELTA,
                **{"skip_special_tokens": True, **features},
            )
        except (ValueError, TypeError) as exc:  # vLLM's own checks of parameter combinations
            raise BadRequest(f"invalid sampling parameters: {exc}") from exc

    def _completion_budget(self, request: ChatCompletionRequest, num_prompt_tokens: int) -> int:
        limit = self.engine.max_model_len
        requested = request.completion_limit
        cap = self.settings.max_tokens_limit
        if requested is not None and cap is not None and requested > cap:
            raise BadRequest(
                f"max_tokens={requested} exceeds this server's limit of {cap}", param="max_tokens"
            )
        if requested is None and self.settings.default_max_tokens is not None:
            requested = min(self.settings.default_max_tokens, limit - num_prompt_tokens)
        if num_prompt_tokens >= limit or (
            requested is not None and num_prompt_tokens + requested > limit
        ):
            completion = requested or 1
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + completion} tokens ({num_prompt_tokens} in the messages, "
                f"{completion} in the completion). Please reduce the length of the messages, "
                "the images or max_tokens.",
                param="messages",
            )
        return requested if requested is not None else limit - num_prompt_tokens

    async def prepare(self, request: ChatCompletionRequest, request_id: str) -> PreparedChat:
        """Validate, fetch and encode images, build the engine prompt. Run inside an
        ``admission.slot()`` that also covers ``complete``/``stream``."""
        arrived = time.perf_counter()
        if self.engine.errored:  # no image work for a request the engine cannot serve
            raise EngineUnavailable("the language engine has stopped; retry later")
        chat = await self._prepare(request, request_id, arrived)
        metrics.prompt_tokens.inc(chat.num_prompt_tokens)
        if chat.vision is not None:
            metrics.images.inc(chat.vision.images)
            metrics.image_tokens.inc(chat.vision.image_tokens)
            metrics.vir_tokens_saved.inc(chat.vision_tokens_saved)
        return chat

    async def _prepare(
        self, request: ChatCompletionRequest, request_id: str, arrived: float
    ) -> PreparedChat:
        image_parts = self._validate(request)
        features = self.features.resolve(request)
        images = await self._load_images(image_parts) if image_parts else []
        options = EncodeOptions(
            max_tiles=request.max_tiles or self.settings.max_tiles,
            vir=request.vir,
            vir_threshold=request.vir_threshold,
        )
        # Tokenizing the chat overlaps with the vision service encoding the images.
        tokenize = asyncio.ensure_future(
            asyncio.to_thread(self.prompts.tokenize, request.messages, features.template_tools)
        )
        visuals: list[VisualEmbedding] = []
        try:
            if images:
                started = time.perf_counter()
                visuals = await self.encoder.encode(images, options, request_id)
                metrics.vision_seconds.observe(time.perf_counter() - started)
        except BaseException:
            # Nobody will await the tokenizer now; consume its outcome so it is not reported.
            tokenize.add_done_callback(lambda task: task.cancelled() or task.exception())
            raise
        tokenized: TokenizedPrompt = await tokenize
        expanded: ExpandedPrompt = expand_prompt(tokenized, [v.num_visual_tokens for v in visuals])
        num_prompt_tokens = len(expanded.token_ids)
        max_tokens = self._completion_budget(request, num_prompt_tokens)
        engine_prompt = await asyncio.to_thread(
            self.engine.build_prompt, expanded, [v.embeddings for v in visuals]
        )
        # vLLM checks the parameters (a grammar compiles here) off the event loop, so that a
        # bad schema or token id is a 400 even for a stream.
        sampling_params = self._sampling_params(request, max_tokens, features.sampling)
        await asyncio.to_thread(
            self.engine.check_sampling_params, sampling_params, features.constraint_source
        )
        return PreparedChat(
            request_id=request_id,
            created=int(time.time()),
            engine_prompt=engine_prompt,
            sampling_params=sampling_params,
            num_prompt_tokens=num_prompt_tokens,
            num_image_tokens=expanded.num_image_tokens,
            n=request.n,
            arrived=arrived,
            vision=_vision_summary(visuals),
            vision_tokens_saved=sum(v.tokens_saved for v in visuals),
            output=features.output,
        )

    def _usage(self, chat: PreparedChat, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=chat.num_prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=chat.num_prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(image_tokens=chat.num_image_tokens),
        )

    # ---- generation ------------------------------------------------------------------------

    async def _generate(self, chat: PreparedChat) -> AsyncGenerator[Any, None]:
        """vLLM's outputs for one prepared chat, with latency and token accounting. Closing
        this generator aborts the request in vLLM."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        first_token_at: float | None = None
        generated = 0
        engine_outputs = self.engine.generate(
            chat.engine_prompt, chat.sampling_params, chat.request_id
        )
        try:
            async with contextlib.aclosing(engine_outputs) as outputs:
                async for output in outputs:
                    produced = sum(len(completion.token_ids) for completion in output.outputs)
                    if produced and first_token_at is None:
                        first_token_at = time.perf_counter()
                        metrics.time_to_first_token.observe(first_token_at - chat.arrived)
                    generated += produced
                    yield output
            metrics.e2e_request_latency.observe(time.perf_counter() - chat.arrived)
        except VLLMClientError as exc:  # the engine refused the request as submitted
            raise BadRequest(str(exc)) from exc
        except EngineDeadError as exc:  # the engine process died; the server is exiting
            raise EngineUnavailable("the language engine has stopped; retry later") from exc
        finally:
            metrics.generation_tokens.inc(generated)

    async def complete(
        self, chat: PreparedChat, return_token_ids: bool = False
    ) -> ChatCompletionResponse:
        choices = [
            ChoiceOutput(i, chat.output, streaming=False, return_token_ids=return_token_ids)
            for i in range(chat.n)
        ]
        async with contextlib.aclosing(self._generate(chat)) as engine_outputs:
            async for output in engine_outputs:
                for completion in output.outputs:
                    choices[completion.index].add(completion)
        return ChatCompletionResponse(
            id=chat.request_id,
            created=chat.created,
            model=self.model_name,
            choices=[choice.choice() for choice in choices],
            usage=self._usage(chat, sum(len(choice.token_ids) for choice in choices)),
            vision=chat.vision,
        )

    def _chunk(
        self,
        chat: PreparedChat,
        choices: list[ChunkChoice],
        usage: Usage | None = None,
        vision: VisionSummary | None = None,
    ) -> str:
        chunk = ChatCompletionChunk(
            id=chat.request_id,
            created=chat.created,
            model=self.model_name,
            choices=choices,
            usage=usage,
            vision=vision,
        )
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    async def stream(
        self, chat: PreparedChat, include_usage: bool = False, return_token_ids: bool = False
    ) -> AsyncGenerator[str, None]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        completion_tokens = 0
        outputs = [
            ChoiceOutput(i, chat.output, streaming=True, return_token_ids=return_token_ids)
            for i in range(chat.n)
        ]
        try:
            yield self._chunk(
                chat,
                [
                    ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                    for i in range(chat.n)
                ],
                vision=chat.vision,
            )
            async with contextlib.aclosing(self._generate(chat)) as engine_outputs:
                async for output in engine_outputs:
                    choices = []
                    for completion in output.outputs:
                        completion_tokens += len(completion.token_ids)
                        chunk = outputs[completion.index].add(completion)
                        if chunk is not None:
                            choices.append(chunk)
                    if choices:
                        yield self._chunk(chat, choices)
            if include_usage:
                usage = self._usage(chat, completion_tokens)
                yield self._chunk(chat, [], usage=usage, vision=chat.vision)
        except asyncio.CancelledError:
            logger.info("request %s: client went away; generation aborted", chat.request_id)
            raise
        except Exception as exc:
            logger.exception("request %s failed while streaming", chat.request_id)
            error = exc if isinstance(exc, APIError) else APIError("generation failed")
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
