"""``/tokenize`` and ``/detokenize``: what vLLM's endpoints answer, for DvD's prompts.

A chat is rendered exactly as ``/v1/chat/completions`` renders it (``ChatService.render``):
the checkpoint's template, the tools, and every image and video widened to the visual tokens
the vision service produced for it (so an image is encoded to be counted, under the request's
``vir`` and ``max_tiles``). The image positions hold the context-image token, as vLLM's own
``/tokenize`` shows a multimodal prompt. A text is tokenized as a completion prompt is. The
length is reported, not checked against the context: clients ask in order to check it.
"""

from __future__ import annotations

import asyncio

from llm_server.api.serving import ChatService
from llm_server.api.tokenize_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from llm_server.errors import BadRequest, ModelNotFound


class TokenizationService:
    """The logic behind ``/tokenize`` and ``/detokenize`` (no HTTP objects here)."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.tokenizer = chat.prompts.tokenizer

    def _check_model(self, model: str | None) -> None:
        # vLLM's tokenize requests may leave the model out.
        if model is not None and model != self.chat.model_name:
            raise ModelNotFound(
                f"The model {model!r} does not exist; this server serves {self.chat.model_name!r}.",
                param="model",
            )

    def _response(self, token_ids: list[int], return_token_strs: bool | None) -> TokenizeResponse:
        token_strs = None
        if return_token_strs:
            token_strs = list(self.tokenizer.convert_ids_to_tokens(token_ids))
        return TokenizeResponse(
            count=len(token_ids),
            max_model_len=self.chat.engine.max_model_len,
            tokens=token_ids,
            token_strs=token_strs,
        )

    async def tokenize_chat(
        self, request: TokenizeChatRequest, request_id: str
    ) -> TokenizeResponse:
        """The chat's prompt tokens, images and videos as their visual tokens. Run inside an
        ``admission.slot()`` when the chat has images or videos (they are encoded)."""
        self._check_model(request.model)
        unsupported = request.unsupported_feature()
        if unsupported:
            raise BadRequest(f"{unsupported} is not supported by this server", param=unsupported)
        rendered = await self.chat.render(
            request.chat_request(self.chat.model_name), request_id, request.template_options()
        )
        return self._response(list(rendered.expanded.token_ids), request.return_token_strs)

    async def tokenize_text(self, request: TokenizeCompletionRequest) -> TokenizeResponse:
        """The text's tokens, as a completion prompt."""
        self._check_model(request.model)
        limit = self.chat.settings.max_text_chars
        if len(request.prompt) > limit:
            raise BadRequest(
                f"the prompt has {len(request.prompt)} characters; the limit is {limit}",
                param="prompt",
            )
        token_ids = await asyncio.to_thread(
            self.tokenizer.encode, request.prompt, add_special_tokens=request.add_special_tokens
        )
        return self._response(list(token_ids), request.return_token_strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids (special tokens included, as vLLM decodes them)."""
        self._check_model(request.model)
        vocab_size = self.chat.engine.vocab_size
        invalid = [token for token in request.tokens if token >= vocab_size]
        if invalid:
            raise BadRequest(
                f"token id {invalid[0]} is out of vocabulary (the model has {vocab_size} "
                "token ids)",
                param="tokens",
            )
        text = await asyncio.to_thread(self.tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=str(text))
