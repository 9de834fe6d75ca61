"""vLLM's sample logprobs -> OpenAI's ``choices[].logprobs.content[]``.

vLLM returns, for every generated token, a dict ``token id -> Logprob(logprob, rank,
decoded_token)`` holding the sampled token and the ``top_logprobs`` most likely ones (computed
from the raw logits, before temperature, penalties, ``logit_bias`` or a grammar). OpenAI's
shape is a list with, per token, its text, its log-probability, its UTF-8 bytes and the top
alternatives ordered from the most likely.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from llm_server.api.protocol import TokenLogprob, TopLogprob


class TokenBytes:
    """The exact bytes of each vocabulary token.

    A byte-level BPE token may hold part of a UTF-8 character, which decodes to U+FFFD on its
    own; OpenAI's ``bytes`` field exists so that clients can join such pieces. Byte-level
    tokens are stored as printable stand-ins for their bytes (GPT-2's alphabet), which this
    maps back; added tokens and other tokenizers' pieces are their text in UTF-8.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._byte_of: dict[str, int] | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import decoders

            if isinstance(backend.decoder, decoders.ByteLevel):
                from transformers.convert_slow_tokenizer import bytes_to_unicode

                self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._added = set(tokenizer.get_added_vocab().values())
        self.of = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int, text: str) -> list[int]:
        if self._byte_of is not None and token_id not in self._added:
            raw = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(raw, str) and all(char in self._byte_of for char in raw):
                return [self._byte_of[char] for char in raw]
        return list(text.encode("utf-8", errors="replace"))


def _text(token_id: int, decoded: str | None) -> str:
    # vLLM decodes every logprob token unless detokenization is off; keep the id otherwise.
    return decoded if decoded is not None else f"token_id:{token_id}"


def chat_logprobs(
    token_ids: Iterable[int],
    steps: Iterable[Mapping[int, Any] | None],
    top_logprobs: int,
    token_bytes: TokenBytes,
) -> list[TokenLogprob]:
    """One entry per generated token: the sampled token and its ``top_logprobs`` best
    alternatives (vLLM's ``rank`` orders them; the sampled token may be outside them)."""
    entries = []
    for token_id, step in zip(token_ids, steps, strict=True):
        if step is None:  # vLLM had no logprobs for this position
            continue
        sampled = step[token_id]
        text = _text(token_id, sampled.decoded_token)
        ranked = sorted(
            (
                (candidate, logprob)
                for candidate, logprob in step.items()
                if logprob.rank is not None and logprob.rank <= top_logprobs
            ),
            key=lambda item: item[1].rank,
        )[:top_logprobs]
        alternatives = []
        for candidate, logprob in ranked:
            candidate_text = _text(candidate, logprob.decoded_token)
            alternatives.append(
                TopLogprob(
                    token=candidate_text,
                    logprob=max(logprob.logprob, -9999.0),
                    bytes=token_bytes.of(candidate, candidate_text),
                )
            )
        entries.append(
            TokenLogprob(
                token=text,
                logprob=max(sampled.logprob, -9999.0),  # -inf is not JSON
                bytes=token_bytes.of(token_id, text),
                top_logprobs=alternatives,
            )
        )
    return entries
