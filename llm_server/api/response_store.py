"""Stored responses (``store: true``): what ``previous_response_id`` continues and
``GET /v1/responses/{id}`` reads back, in this process's memory, bounded in size and age.

Each entry holds its response and its whole conversation (the history it continued, its own
input, its answer), images as they were sent. Its size is counted from the text and URLs it
holds (an entry that continues another shares the earlier messages' objects, but is charged
for them again: the count is an upper bound). The oldest entries leave first, when the store
is full or when they have lived ``ttl_s``; an expired or evicted id is as unknown as one that
never existed. Replicas do not share their stores: continuing a conversation needs the
replica that stored it (or one replica).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from llm_server.api.protocol import ChatMessage, ImagePart, TextPart, VideoPart
from llm_server.api.response_protocol import ResponseObject

ENTRY_OVERHEAD_BYTES = 1024  # objects around the strings: a rough, generous share per item


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    conversation: list[ChatMessage]  # without the request's instructions (not carried over)
    size: int
    expires_at: float  # time.monotonic()


def conversation_size(conversation: list[ChatMessage], response: ResponseObject) -> int:
    """Bytes an entry is charged: its strings (text, image URLs, tool calls) and a share of
    overhead per message and part. Costs O(parts): run it off the event loop."""
    size = ENTRY_OVERHEAD_BYTES * (1 + len(conversation) + len(response.output))
    for message in conversation:
        if isinstance(message.content, str):
            size += len(message.content)
        elif message.content is not None:
            for part in message.content:
                size += ENTRY_OVERHEAD_BYTES
                if isinstance(part, TextPart):
                    size += len(part.text)
                elif isinstance(part, ImagePart):
                    size += len(part.image_url.url)
                elif isinstance(part, VideoPart):
                    size += len(part.video_url.url)
        for call in message.tool_calls or []:
            size += ENTRY_OVERHEAD_BYTES + len(call.function.arguments) + len(call.function.name)
    for item in response.output:
        size += len(item.model_dump_json())
    return size


class ResponseStore:
    """At most ``max_bytes`` of entries, each for at most ``ttl_s`` seconds."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: ResponseObject, conversation: list[ChatMessage], size: int) -> bool:
        """Keep ``response`` (``size`` from ``conversation_size``); False when it cannot fit
        at all (it is then not stored)."""
        self._expire()
        if size > self.max_bytes:
            return False
        self._drop(response.id)
        while self._entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        entry = StoredResponse(response, conversation, size, time.monotonic() + self.ttl_s)
        self._entries[response.id] = entry
        self.bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The live entry of ``response_id``, or None (never stored, expired or evicted)."""
        self._expire()
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._drop(response_id)

    def _drop(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True

    def _expire(self) -> None:
        # Entries are kept in insertion order with one TTL, so in order of expiry.
        now = time.monotonic()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                break
            self._drop(oldest.response.id)
