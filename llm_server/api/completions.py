"""Completions (``/v1/completions``): text or token-id prompts, no chat template, no images.

The chat path's pieces do the work: its admission slot, its limits (from the same settings),
its engine (vLLM, fed token ids as ``vllm serve`` feeds them), its accounting and its errors.
Each prompt is one vLLM request generating ``n`` choices; choice ``i * n + j`` is prompt
``i``'s ``j``-th, as OpenAI and vLLM number them. ``echo`` puts the prompt in front of each
choice (with ``logprobs``: its tokens' logprobs, the first one null); ``echo`` with
``max_tokens=0`` returns the prompt alone (what evaluation harnesses use to score a text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_server import metrics
from llm_server.api.completion_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from llm_server.api.protocol import PromptTokensDetails, Usage
from llm_server.api.serving import ChatService, PreparedChat
from llm_server.errors import (
    APIError,
    BadRequest,
    ContextLengthExceeded,
    EngineUnavailable,
    ModelNotFound,
)
from llm_server.prompt import ExpandedPrompt

logger = logging.getLogger(__name__)


@dataclass
class PromptRun:
    """One prompt of a completion request: its tokens, text and vLLM request."""

    index: int
    token_ids: list[int]
    text: str  # the prompt as text (decoded for a token-id prompt): what echo returns
    chat: PreparedChat  # the engine request (the chat path's unit of generation)
    # echo with logprobs: the prompt's entries, built once (off the loop) for its n choices.
    echo_logprobs: CompletionLogprobs | None = None


@dataclass
class PreparedCompletion:
    request_id: str
    created: int
    n: int
    echo: bool
    echo_only: bool  # echo with max_tokens=0: the prompt is the whole answer
    logprobs: int | None
    return_token_ids: bool
    prompts: list[PromptRun] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(run.token_ids) for run in self.prompts)


class ChoiceText:
    """Text, token ids and logprobs of one choice, built from vLLM's increments."""

    def __init__(self, index: int, run: PromptRun, prepared: PreparedCompletion) -> None:
        self.index = index
        self.run = run
        self.prepared = prepared
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs = CompletionLogprobs()
        self.finish_reason: str | None = None
        self.echoed = False
        self.next_offset = 0  # text_offset of the next token

    def add(self, completion: Any, tokenizer: Any) -> CompletionChoice:
        """Take one increment (``RequestOutputKind.DELTA``); return it as a stream choice."""
        prepared = self.prepared
        text = ""
        logprobs = CompletionLogprobs() if prepared.logprobs is not None else None
        if prepared.echo and not self.echoed:
            self.echoed = True
            text = self.run.text
            if logprobs is not None and self.run.echo_logprobs is not None:
                _extend(logprobs, self.run.echo_logprobs)
                self.next_offset = len(self.run.text)
        if not prepared.echo_only:
            text += completion.text
            self.token_ids += list(completion.token_ids)
            if logprobs is not None:
                steps = completion.logprobs or [None] * len(completion.token_ids)
                generated = completion_logprobs(
                    completion.token_ids, steps, prepared.logprobs or 0, tokenizer, self.next_offset
                )
                self.next_offset += sum(len(token) for token in generated.tokens)
                _extend(logprobs, generated)
        if completion.finish_reason is not None:
            self.finish_reason = completion.finish_reason
        self.text += text
        if logprobs is not None:
            _extend(self.logprobs, logprobs)
        return CompletionChoice(
            index=self.index,
            text=text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            token_ids=list(completion.token_ids) if prepared.return_token_ids else None,
        )

    def choice(self) -> CompletionChoice:
        return CompletionChoice(
            index=self.index,
            text=self.text,
            logprobs=self.logprobs if self.prepared.logprobs is not None else None,
            finish_reason=self.finish_reason,
            token_ids=self.token_ids if self.prepared.return_token_ids else None,
            prompt_token_ids=self.run.token_ids if self.prepared.return_token_ids else None,
        )


def _extend(whole: CompletionLogprobs, part: CompletionLogprobs) -> None:
    # New lists: a prompt's echo entries are shared by its choices.
    whole.tokens = whole.tokens + part.tokens
    whole.token_logprobs = whole.token_logprobs + part.token_logprobs
    whole.top_logprobs = whole.top_logprobs + part.top_logprobs
    whole.text_offset = whole.text_offset + part.text_offset


def completion_logprobs(
    token_ids: Sequence[int],
    steps: Sequence[Mapping[int, Any] | None],
    top: int,
    tokenizer: Any,
    first_offset: int = 0,
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs of ``token_ids``: each token's text and logprob (null where
    vLLM has none: a prompt's first token), its ``top`` most likely alternatives plus itself,
    and its character offset, counted from ``first_offset``."""
    out = CompletionLogprobs()
    offset = first_offset
    for token_id, step in zip(token_ids, steps, strict=True):
        if step is None:
            token = str(tokenizer.decode([token_id]))
            out.tokens.append(token)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            sampled = step[token_id]
            token = _token_text(tokenizer, token_id, sampled.decoded_token)
            out.tokens.append(token)
            out.token_logprobs.append(max(sampled.logprob, -9999.0))  # -inf is not JSON
            ranked = sorted(
                (
                    (candidate, logprob)
                    for candidate, logprob in step.items()
                    if logprob.rank is not None and logprob.rank <= top
                ),
                key=lambda item: item[1].rank,
            )[:top]
            alternatives = {
                _token_text(tokenizer, candidate, logprob.decoded_token): max(
                    logprob.logprob, -9999.0
                )
                for candidate, logprob in ranked
            }
            alternatives.setdefault(token, max(sampled.logprob, -9999.0))
            out.top_logprobs.append(alternatives)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def _token_text(tokenizer: Any, token_id: int, decoded: str | None) -> str:
    return decoded if decoded is not None else str(tokenizer.decode([token_id]))


async def _merged(
    generators: Sequence[AsyncGenerator[Any, None]],
) -> AsyncIterator[tuple[int, Any]]:
    """(index, output) from every generator as they come. Each generator runs in its own task
    (closing a generator is its own task's job); leaving early cancels them all, which aborts
    their vLLM requests."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, outputs: AsyncGenerator[Any, None]) -> None:
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    await queue.put((index, output))
            await queue.put((index, done))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises)
            await queue.put((index, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output = await queue.get()
            if output is done:
                remaining -= 1
            elif isinstance(output, BaseException):
                raise output
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CompletionService:
    """The logic behind ``/v1/completions`` (no HTTP objects here), on the chat service's
    engine, tokenizer, settings and admission."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.settings = chat.settings
        self.tokenizer = chat.prompts.tokenizer
        self.admission = chat.admission

    # ---- preparation ---------------------------------------------------------------------

    def _validate(self, request: CompletionRequest) -> None:
        """Every bound checked before any work is spent (the limits chat requests meet)."""
        settings = self.settings
        if request.model != self.chat.model_name:
            raise ModelNotFound(
                f"The model {request.model!r} does not exist; "
                f"this server serves {self.chat.model_name!r}.",
                param="model",
            )
        if request.suffix:
            raise BadRequest(
                "suffix is not supported: this server's models have no fill-in-the-middle format",
                param="suffix",
            )
        if request.best_of is not None and request.best_of != request.n:
            raise BadRequest("best_of is not supported (other than best_of = n)", param="best_of")
        if request.n > settings.max_n:
            raise BadRequest(
                f"n={request.n} exceeds this server's limit of {settings.max_n}", param="n"
            )
        prompts = request.prompts
        if len(prompts) > settings.max_prompts:
            raise BadRequest(
                f"{len(prompts)} prompts in one request; the limit is {settings.max_prompts}",
                param="prompt",
            )
        if request.max_tokens == 0 and not request.echo:
            raise BadRequest("max_tokens=0 needs echo=true", param="max_tokens")
        cap = settings.max_tokens_limit
        if request.max_tokens is not None and cap is not None and request.max_tokens > cap:
            raise BadRequest(
                f"max_tokens={request.max_tokens} exceeds this server's limit of {cap}",
                param="max_tokens",
            )
        stops = request.stop_sequences
        if len(stops) > settings.max_stop_sequences:
            raise BadRequest(
                f"{len(stops)} stop sequences in one request; the limit is "
                f"{settings.max_stop_sequences}",
                param="stop",
            )
        longest = max((len(stop) for stop in stops), default=0)
        if longest > settings.max_stop_chars:
            raise BadRequest(
                f"a stop sequence of {longest} characters; the limit is {settings.max_stop_chars}",
                param="stop",
            )
        entries = len(request.logit_bias or {})
        if entries > settings.max_logit_bias:
            raise BadRequest(
                f"{entries} logit_bias entries in one request; the limit is "
                f"{settings.max_logit_bias}",
                param="logit_bias",
            )
        if request.logprobs is not None and request.logprobs > settings.max_top_logprobs:
            raise BadRequest(
                f"logprobs={request.logprobs} exceeds this server's limit of "
                f"{settings.max_top_logprobs}",
                param="logprobs",
            )
        limit = self.chat.engine.max_model_len
        chars = 0
        for prompt in prompts:
            if isinstance(prompt, str):
                chars += len(prompt)
            elif len(prompt) >= limit:  # token ids: at least the context, before any work
                raise self._too_long(len(prompt), request.max_tokens or 1)
        if chars > settings.max_text_chars:
            raise BadRequest(
                f"the prompts hold {chars} characters of text; the limit is "
                f"{settings.max_text_chars}",
                param="prompt",
            )

    def _too_long(self, num_prompt_tokens: int, completion: int) -> ContextLengthExceeded:
        limit = self.chat.engine.max_model_len
        return ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + completion} tokens ({num_prompt_tokens} in the prompt, "
            f"{completion} in the completion). Please reduce the length of the prompt or "
            "max_tokens.",
            param="prompt",
        )

    def _tokenize(self, prompts: list[str] | list[list[int]]) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt. Blocking (tokenizing, decoding): off the loop."""
        vocab = self.chat.engine.vocab_size
        out: list[tuple[list[int], str]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                # As vLLM tokenizes a completion prompt: with the tokenizer's special tokens.
                ids = list(self.tokenizer(prompt, add_special_tokens=True).input_ids)
                out.append((ids, prompt))
                continue
            if max(prompt) >= vocab:
                raise BadRequest(
                    f"token id {max(prompt)} is out of the vocabulary [0, {vocab})",
                    param="prompt",
                )
            out.append((list(prompt), str(self.tokenizer.decode(prompt))))
        return out

    def _budget(self, request: CompletionRequest, num_prompt_tokens: int) -> int:
        limit = self.chat.engine.max_model_len
        requested = request.max_tokens
        if requested is None:
            requested = self.settings.default_max_tokens or limit - num_prompt_tokens
        if num_prompt_tokens >= limit or num_prompt_tokens + requested > limit:
            raise self._too_long(num_prompt_tokens, requested or 1)
        return requested

    def _sampling_params(self, request: CompletionRequest, max_tokens: int) -> Any:
        extra: dict[str, Any] = {"ignore_eos": request.ignore_eos}
        if request.logprobs is not None:
            extra["logprobs"] = request.logprobs
            if request.echo:
                extra["prompt_logprobs"] = request.logprobs
        if request.logit_bias:
            extra["logit_bias"] = self.chat.features.token_biases(request.logit_bias)
        # echo with max_tokens=0: vLLM still computes one token (the prompt's logprobs come
        # with it); the answer is the prompt alone.
        return self.chat.sampling_params(request, max_tokens or 1, **extra)

    async def prepare(self, request: CompletionRequest, request_id: str) -> PreparedCompletion:
        """Validate, tokenize and build the engine requests. Run inside an
        ``admission.slot()`` that also covers ``complete``/``stream``."""
        arrived = time.perf_counter()
        if self.chat.engine.errored:
            raise EngineUnavailable("the language engine has stopped; retry later")
        self._validate(request)
        tokenized = await asyncio.to_thread(self._tokenize, request.prompts)
        budgets = [self._budget(request, len(ids)) for ids, _ in tokenized]
        engine = self.chat.engine
        engine_prompts = await asyncio.to_thread(
            lambda: [
                engine.build_prompt(ExpandedPrompt(ids, [True] * len(ids), []), [])
                for ids, _ in tokenized
            ]
        )
        prepared = PreparedCompletion(
            request_id=request_id,
            created=int(time.time()),
            n=request.n,
            echo=request.echo,
            echo_only=request.echo and request.max_tokens == 0,
            logprobs=request.logprobs,
            return_token_ids=request.return_token_ids,
        )
        for index, ((ids, text), budget, engine_prompt) in enumerate(
            zip(tokenized, budgets, engine_prompts, strict=True)
        ):
            sampling_params = self._sampling_params(request, budget)
            if index == 0:  # the same parameters for every prompt: checked once, off the loop
                await asyncio.to_thread(engine.check_sampling_params, sampling_params)
            run_id = request_id if len(tokenized) == 1 else f"{request_id}-{index}"
            prepared.prompts.append(
                PromptRun(
                    index=index,
                    token_ids=ids,
                    text=text,
                    chat=PreparedChat(
                        request_id=run_id,
                        created=prepared.created,
                        engine_prompt=engine_prompt,
                        sampling_params=sampling_params,
                        num_prompt_tokens=len(ids),
                        num_image_tokens=0,
                        n=request.n,
                        arrived=arrived,
                    ),
                )
            )
        metrics.prompt_tokens.inc(prepared.num_prompt_tokens)
        return prepared

    # ---- generation ------------------------------------------------------------------------

    def _choices(self, prepared: PreparedCompletion) -> list[ChoiceText]:
        return [
            ChoiceText(run.index * prepared.n + j, run, prepared)
            for run in prepared.prompts
            for j in range(prepared.n)
        ]

    def _outputs(self, prepared: PreparedCompletion) -> AsyncIterator[tuple[int, Any]]:
        return _merged([self.chat.generate(run.chat) for run in prepared.prompts])

    async def _echo_logprobs(
        self, prepared: PreparedCompletion, run: PromptRun, output: Any
    ) -> None:
        """With echo and logprobs: the prompt's entries, from the first output of its
        request. Built on a thread: their number is the prompt's length times ``logprobs``."""
        if not prepared.echo or prepared.logprobs is None or run.echo_logprobs is not None:
            return
        steps = output.prompt_logprobs or [None] * len(run.token_ids)
        run.echo_logprobs = await asyncio.to_thread(
            completion_logprobs, run.token_ids, steps, prepared.logprobs, self.tokenizer
        )

    def _usage(self, prepared: PreparedCompletion, choices: list[ChoiceText]) -> Usage:
        completion_tokens = sum(len(choice.token_ids) for choice in choices)
        cached = sum(run.chat.cached_tokens for run in prepared.prompts)
        return Usage(
            prompt_tokens=prepared.num_prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prepared.num_prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    async def complete(self, prepared: PreparedCompletion) -> CompletionResponse:
        choices = self._choices(prepared)
        outputs = self._outputs(prepared)
        async with contextlib.aclosing(outputs):  # type: ignore[type-var]
            async for index, output in outputs:
                run = prepared.prompts[index]
                await self._echo_logprobs(prepared, run, output)
                for completion in output.outputs:
                    choice = choices[run.index * prepared.n + completion.index]
                    choice.add(completion, self.tokenizer)
        return CompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=self.chat.model_name,
            choices=[choice.choice() for choice in choices],
            usage=self._usage(prepared, choices),
        )

    def _chunk(
        self,
        prepared: PreparedCompletion,
        choices: list[CompletionChoice],
        usage: Usage | None = None,
    ) -> str:
        chunk = CompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=self.chat.model_name,
            choices=choices,
            usage=usage,
        )
        return f"data: {json.dumps(chunk.wire())}\n\n"

    async def stream(
        self, prepared: PreparedCompletion, include_usage: bool = False
    ) -> AsyncGenerator[str, None]:
        """Server-sent events in OpenAI's completion chunk format, ending with ``[DONE]``."""
        choices = self._choices(prepared)
        try:
            outputs = self._outputs(prepared)
            async with contextlib.aclosing(outputs):  # type: ignore[type-var]
                async for index, output in outputs:
                    run = prepared.prompts[index]
                    await self._echo_logprobs(prepared, run, output)
                    pieces = [
                        choices[run.index * prepared.n + completion.index].add(
                            completion, self.tokenizer
                        )
                        for completion in output.outputs
                    ]
                    pieces = [
                        piece
                        for piece in pieces
                        if piece.text
                        or piece.finish_reason
                        or piece.token_ids
                        or (piece.logprobs is not None and piece.logprobs.tokens)
                    ]
                    if pieces:
                        yield self._chunk(prepared, pieces)
            if include_usage:
                yield self._chunk(prepared, [], usage=self._usage(prepared, choices))
        except asyncio.CancelledError:
            logger.info("request %s: client went away; generation aborted", prepared.request_id)
            raise
        except Exception as exc:
            logger.exception("request %s failed while streaming", prepared.request_id)
            error = exc if isinstance(exc, APIError) else APIError("generation failed")
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
