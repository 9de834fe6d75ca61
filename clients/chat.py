"""A small command-line chat client for any OpenAI-compatible server (streams the answer).

python clients/chat.py --image photo.jpg "What is in this picture?"
python clients/chat.py --image https://example.com/cat.png --image chart.png "Compare."
python clients/chat.py --interactive            # multi-turn; /image PATH attaches one
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from openai import OpenAI
from openai.types.chat import ChatCompletionChunk


def image_part(location: str) -> dict[str, Any]:
    """An ``image_url`` content part: URLs pass through, files become ``data:`` URLs."""
    if location.startswith(("http://", "https://", "data:")):
        url = location
    else:
        path = Path(location).expanduser()
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def user_message(text: str, images: list[str]) -> dict[str, Any]:
    if not images:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [*(image_part(i) for i in images), {"type": "text", "text": text}],
    }


def ask(
    client: OpenAI, model: str, messages: list[dict[str, Any]], max_tokens: int, temperature: float
) -> str:
    """Stream one answer to stdout; return its text."""
    stream = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=temperature,
        stream=True,
    )
    pieces = []
    for chunk in cast(Iterable[ChatCompletionChunk], stream):
        if chunk.choices and chunk.choices[0].delta.content:
            piece = chunk.choices[0].delta.content
            pieces.append(piece)
            print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chat.py", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="the question (omit with --interactive)")
    parser.add_argument(
        "--image", action="append", default=[], help="image file or URL (repeatable)"
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin")
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    messages: list[dict[str, Any]] = []
    if not args.interactive:
        if not args.prompt:
            parser.error("a prompt is required (or use --interactive)")
        ask(
            client,
            model,
            [user_message(args.prompt, args.image)],
            args.max_tokens,
            args.temperature,
        )
        return
    pending_images = list(args.image)
    print(f"chatting with {model}; /image PATH attaches an image, Ctrl-D quits", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/image "):
            pending_images.append(text.removeprefix("/image ").strip())
            continue
        messages.append(user_message(text, pending_images))
        pending_images = []
        answer = ask(client, model, messages, args.max_tokens, args.temperature)
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    main()
