"""Chat completions: messages + images and videos -> vision embeddings + prompt -> vLLM ->
OpenAI replies.

Per request: fetch the image and video bytes, then in parallel (a) send them to the image
encoder and (b) render and tokenize the chat (a video as ``num_frames`` frame placeholders);
widen each placeholder to the number of visual tokens the encoder reports; hand vLLM the token
ids plus the visual rows; stream tokens back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch

from checkpoints.spec import DEFAULT_VIDEO_FRAMES
from llm_server import metrics, tracing
from llm_server.api.admission import Admission
from llm_server.api.choices import ChoiceOutput
from llm_server.api.features import OpenAIFeatures, OutputOptions, RequestFeatures
from llm_server.api.limits import check_request_limits
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
    VideoPart,
    VisionSummary,
    VisualPart,
)
from llm_server.engine.language_model import LanguageEngine
from llm_server.errors import (
    APIError,
    BadRequest,
    ContextLengthExceeded,
    EngineUnavailable,
    ModelNotFound,
    TooManyItems,
)
from llm_server.images import MediaLoader
from llm_server.prompt import (
    ExpandedPrompt,
    PromptBuilder,
    TemplateOptions,
    TokenizedPrompt,
    expand_prompt,
)
from llm_server.settings import LLMSettings
from llm_server.vision.base import VisualEncoder
from protos.messages import (
    EncodeCall,
    EncodeOptions,
    EncodeResult,
    ImageInput,
    VideoInput,
    over_limit,
    too_many,
)

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
    # Set while generating: prompt tokens vLLM found in its prefix cache.
    cached_tokens: int = 0
    num_video_tokens: int = 0


@dataclass
class RenderedChat:
    """A chat's prompt, its images' and videos' visual tokens in place (``ChatService.render``)."""

    features: RequestFeatures
    result: EncodeResult
    rows: list[torch.Tensor]  # each placeholder's rows, in prompt order: [tokens, hidden]
    expanded: ExpandedPrompt


def _vision_summary(result: EncodeResult, budget: int | None = None) -> VisionSummary | None:
    visuals = result.items
    if not visuals:
        return None
    images, videos = result.images, result.videos
    summary = VisionSummary(
        images=len(images),
        cached_images=sum(1 for v in images if v.from_cache),
        tiles=sum(len(v.tokens_per_tile) for v in images),
        compressed_tiles=sum(v.num_compressed_tiles for v in images),
        image_tokens=sum(v.num_visual_tokens for v in images),
        vir=visuals[0].vir or "unavailable",
        max_visual_tokens=budget,
    )
    if videos:
        summary.videos = len(videos)
        summary.frames = sum(len(v.tokens_per_tile) for v in videos)
        summary.compressed_frames = sum(v.num_compressed_tiles for v in videos)
        summary.video_tokens = sum(v.num_visual_tokens for v in videos)
    return summary


def _placeholder_rows(parts: list[VisualPart], result: EncodeResult) -> list[torch.Tensor]:
    """The rows of each placeholder of the prompt, in prompt order: an image's rows, or one
    frame's."""
    images, videos = iter(result.images), iter(result.videos)
    rows: list[torch.Tensor] = []
    for part in parts:
        if isinstance(part, VideoPart):
            rows.extend(next(videos).frame_rows())
        else:
            rows.append(next(images).embeddings)
    return rows


def _vision_attributes(call: EncodeCall) -> dict[str, Any]:
    return {
        "rpc.system": "grpc",
        "rpc.method": "Encode",
        "dvd.images": len(call.images),
        "dvd.videos": len(call.videos),
    }


def _vision_result_attributes(result: EncodeResult) -> dict[str, Any]:
    items = result.items
    return {
        "dvd.visual_tokens": sum(item.num_visual_tokens for item in items),
        "dvd.tiles": sum(len(item.tokens_per_tile) for item in items),
        "dvd.cached_items": sum(1 for item in items if item.from_cache),
    }


class SamplingRequest(Protocol):
    """The sampling fields chat and completion requests share."""

    @property
    def n(self) -> int: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def stop_sequences(self) -> list[str]: ...
    @property
    def seed(self) -> int | None: ...


def checked_sampling_params(**fields: Any) -> Any:
    """vLLM's ``SamplingParams``; what vLLM's own checks refuse in the combination (``n`` > 1
    when greedy, a bad ``top_p``, ...) is a 400 naming the parameter, not a 500."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError, VLLMClientError) as exc:
        param = getattr(exc, "parameter", None)
        raise BadRequest(f"invalid sampling parameters: {exc}", param=param) from exc


class ChatService:
    """The logic behind ``/v1/chat/completions`` and ``/v1/models`` (no HTTP objects here)."""

    def __init__(
        self,
        engine: LanguageEngine,
        encoder: VisualEncoder,
        prompts: PromptBuilder,
        images: MediaLoader,
        settings: LLMSettings,
        default_num_frames: int | None = None,
        encoder_max_tiles: Callable[[], int | None] | None = None,
    ) -> None:
        self.engine = engine
        self.encoder = encoder
        self.prompts = prompts
        self.images = images
        self.settings = settings
        # Frames per video when a request does not say: the setting, else the checkpoint's.
        self.default_num_frames = settings.num_frames or default_num_frames or DEFAULT_VIDEO_FRAMES
        self.features = OpenAIFeatures(
            prompts.tokenizer, engine.vocab_size, settings.tool_parser, engine.backbone.model_type
        )
        self.model_name = engine.model_name
        self.created = int(time.time())
        # Callers hold a slot (``admission.slot()``) around prepare + complete/stream.
        self.admission = Admission(settings.max_concurrent_requests)
        # The encoder's own per-image tile limit, once known (the vision service reports it
        # when it connects); None: not known (yet).
        self._encoder_max_tiles = encoder_max_tiles

    def max_tiles_limit(self) -> int:
        """The largest per-image ``max_tiles`` a request may ask for: this service's limit,
        and the image encoder's when it is known and tighter."""
        limit = self.settings.max_tiles_limit
        encoder_limit = self._encoder_max_tiles() if self._encoder_max_tiles else None
        return min(limit, encoder_limit) if encoder_limit else limit

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

    def _validate(self, request: ChatCompletionRequest) -> list[VisualPart]:
        """Checks the request; returns its image and video parts, in prompt order."""
        if request.model != self.model_name:
            raise ModelNotFound(
                f"The model {request.model!r} does not exist; "
                f"this server serves {self.model_name!r}.",
                param="model",
            )
        feature = request.unsupported_feature()
        if feature:
            raise BadRequest(f"{feature} is not supported by this server", param=feature)
        check_request_limits(request, self.settings, self.max_tiles_limit())
        parts: list[VisualPart] = [
            part
            for message in request.messages
            if isinstance(message.content, list)
            for part in message.content
            if isinstance(part, ImagePart | VideoPart)
        ]
        num_images = sum(isinstance(part, ImagePart) for part in parts)
        settings = self.settings
        if num_images > settings.max_images_per_request:
            message = too_many("images", num_images, settings.max_images_per_request)
            raise TooManyItems(message, param="messages")
        num_videos = len(parts) - num_images
        if num_videos > settings.max_videos_per_request:
            message = too_many("videos", num_videos, settings.max_videos_per_request)
            raise TooManyItems(message, param="messages")
        num_frames = self.num_frames(request)
        if num_videos and num_frames > settings.max_num_frames:
            message = over_limit(
                "num_frames", num_frames, settings.max_num_frames, "frames per video"
            )
            raise BadRequest(message, param="num_frames")
        return parts

    def num_frames(self, request: ChatCompletionRequest) -> int:
        """Frames sampled from each video of ``request``."""
        return request.num_frames or self.default_num_frames

    async def _load_media(
        self, parts: list[VisualPart], num_frames: int
    ) -> tuple[list[ImageInput], list[VideoInput]]:
        """The bytes of the request's images and of its videos, each in prompt order."""

        async def load_image(index: int, part: ImagePart) -> ImageInput:
            try:
                data = await self.images.load(part.image_url.url)
            except APIError as exc:
                exc.message = f"image {index}: {exc.message}"
                raise
            max_tiles = 1 if part.image_url.detail == "low" else None
            budget = part.image_url.max_visual_tokens
            return ImageInput(data=data, max_tiles=max_tiles, max_visual_tokens=budget)

        async def load_video(index: int, part: VideoPart) -> VideoInput:
            try:
                data = await self.images.load(part.video_url.url, "video")
            except APIError as exc:
                exc.message = f"video {index}: {exc.message}"
                raise
            return VideoInput(data=data, num_frames=num_frames)

        image_parts = [part for part in parts if isinstance(part, ImagePart)]
        video_parts = [part for part in parts if isinstance(part, VideoPart)]
        images = [load_image(i, p) for i, p in enumerate(image_parts)]
        videos = [load_video(i, p) for i, p in enumerate(video_parts)]
        attributes = {"dvd.images": len(images), "dvd.videos": len(videos)}
        with tracing.stage("media", attributes) as span:
            loaded = await asyncio.gather(*images, *videos)
            if span is not None:
                media_bytes = sum(len(cast(ImageInput | VideoInput, item).data) for item in loaded)
                span.set_attribute("dvd.media.bytes", media_bytes)
        return (
            cast(list[ImageInput], loaded[: len(images)]),
            cast(list[VideoInput], loaded[len(images) :]),
        )

    def sampling_params(self, request: SamplingRequest, max_tokens: int, **extra: Any) -> Any:
        """vLLM's ``SamplingParams`` for a chat or completion request: its sampling fields
        over the checkpoint's generation defaults, then ``extra`` (logprobs, logit_bias,
        structured outputs, ...)."""
        from vllm.sampling_params import RequestOutputKind

        defaults = self.engine.default_sampling

        def pick(name: str, value: Any, fallback: Any) -> Any:
            return value if value is not None else defaults.get(name, fallback)

        return checked_sampling_params(
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
            **{"skip_special_tokens": True, **extra},
        )

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
            metrics.videos.inc(chat.vision.videos or 0)
            metrics.video_tokens.inc(chat.vision.video_tokens or 0)
            metrics.vir_tokens_saved.inc(chat.vision_tokens_saved)
        return chat

    async def render(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        template: TemplateOptions | None = None,
    ) -> RenderedChat:
        """Validate the request, fetch and encode its images and videos, and render its
        prompt (as ``template`` asks; by default as for a chat completion) with each
        placeholder widened to the visual tokens the encoder produced."""
        parts = self._validate(request)
        # Off the event loop: checking schemas (jsonschema, in Python) and building tool
        # parsers' structural tags cost what the request's schemas make them cost.
        features = await asyncio.to_thread(self.features.resolve, request)
        num_frames = self.num_frames(request)
        images, videos = await self._load_media(parts, num_frames) if parts else ([], [])
        call = EncodeCall(
            images,
            videos,
            EncodeOptions(
                max_tiles=request.max_tiles or self.settings.max_tiles,
                vir=request.vir,
                vir_threshold=request.vir_threshold,
                max_visual_tokens=request.max_visual_tokens,
            ),
            request_id,
        )
        # Tokenizing the chat overlaps with the vision service encoding the images.
        tokenize = asyncio.ensure_future(
            asyncio.to_thread(
                self.prompts.tokenize,
                request.messages,
                features.template_tools,
                [num_frames] * len(videos),
                template or TemplateOptions(),
            )
        )
        result = EncodeResult()
        try:
            if parts:
                started = time.perf_counter()
                with tracing.stage("vision", _vision_attributes(call), client=True) as span:
                    result = await self.encoder.encode(call)
                    if span is not None:
                        span.set_attributes(_vision_result_attributes(result))
                metrics.vision_seconds.observe(time.perf_counter() - started)
                # The vision service's own queue wait (its longest item), for Server-Timing.
                longest = max((item.queue_ms for item in result.items), default=0.0)
                tracing.record("vision.queue", longest / 1000)
        except BaseException:
            # Nobody will await the tokenizer now; consume its outcome so it is not reported.
            tokenize.add_done_callback(lambda task: task.cancelled() or task.exception())
            raise
        tokenized: TokenizedPrompt = await tokenize
        rows = _placeholder_rows(parts, result)
        expanded: ExpandedPrompt = expand_prompt(tokenized, [int(r.shape[0]) for r in rows])
        return RenderedChat(features, result, rows, expanded)

    async def _prepare(
        self, request: ChatCompletionRequest, request_id: str, arrived: float
    ) -> PreparedChat:
        rendered = await self.render(request, request_id)
        features, result, rows, expanded = (
            rendered.features,
            rendered.result,
            rendered.rows,
            rendered.expanded,
        )
        num_prompt_tokens = len(expanded.token_ids)
        max_tokens = self._completion_budget(request, num_prompt_tokens)
        engine_prompt = await asyncio.to_thread(self.engine.build_prompt, expanded, rows)
        # vLLM checks the parameters (a grammar compiles here) off the event loop, so that a
        # bad schema or token id is a 400 even for a stream.
        sampling_params = self.sampling_params(request, max_tokens, **features.sampling)
        await asyncio.to_thread(
            self.engine.check_sampling_params, sampling_params, features.constraint_source
        )
        return PreparedChat(
            request_id=request_id,
            created=int(time.time()),
            engine_prompt=engine_prompt,
            sampling_params=sampling_params,
            num_prompt_tokens=num_prompt_tokens,
            num_image_tokens=sum(image.num_visual_tokens for image in result.images),
            num_video_tokens=sum(video.num_visual_tokens for video in result.videos),
            n=request.n,
            arrived=arrived,
            vision=_vision_summary(result, request.max_visual_tokens),
            vision_tokens_saved=sum(item.tokens_saved for item in result.items),
            output=features.output,
        )

    def _usage(self, chat: PreparedChat, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=chat.num_prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=chat.num_prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=chat.cached_tokens,
                image_tokens=chat.num_image_tokens,
                video_tokens=chat.num_video_tokens,
            ),
        )

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, chat: PreparedChat) -> AsyncGenerator[Any, None]:
        """vLLM's outputs for one prepared chat, with latency and token accounting. Closing
        this generator aborts the request in vLLM."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        first_token_at: float | None = None
        generated = 0
        engine_outputs = self.engine.generate(
            chat.engine_prompt, chat.sampling_params, chat.request_id
        )
        # Not current: this generator yields to its reader while the span is open.
        span = tracing.start_span("engine", {"dvd.request_id": chat.request_id})
        failure: BaseException | None = None
        stats: Any = None
        try:
            async with contextlib.aclosing(engine_outputs) as outputs:
                async for output in outputs:
                    stats = output.metrics  # vLLM's per-request timestamps (one object)
                    # vLLM reports it once the prompt is scheduled; every later output repeats it.
                    if output.num_cached_tokens:
                        chat.cached_tokens = output.num_cached_tokens
                    produced = sum(len(completion.token_ids) for completion in output.outputs)
                    if produced and first_token_at is None:
                        first_token_at = time.perf_counter()
                        metrics.time_to_first_token.observe(first_token_at - chat.arrived)
                    generated += produced
                    yield output
            metrics.e2e_request_latency.observe(time.perf_counter() - chat.arrived)
        except VLLMClientError as exc:  # the engine refused the request as submitted
            failure = exc
            raise BadRequest(str(exc)) from exc
        except EngineDeadError as exc:  # the engine process died; the server is exiting
            failure = exc
            raise EngineUnavailable("the language engine has stopped; retry later") from exc
        except BaseException as exc:
            failure = exc
            raise
        finally:
            metrics.generation_tokens.inc(generated)
            tracing.engine_spans(span, stats, chat.num_prompt_tokens)
            tracing.end_span(span, failure)

    async def complete(
        self, chat: PreparedChat, return_token_ids: bool = False
    ) -> ChatCompletionResponse:
        choices = [
            ChoiceOutput(i, chat.output, streaming=False, return_token_ids=return_token_ids)
            for i in range(chat.n)
        ]
        async with contextlib.aclosing(self.generate(chat)) as engine_outputs:
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
            async with contextlib.aclosing(self.generate(chat)) as engine_outputs:
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
