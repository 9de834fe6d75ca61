"""The independent oracle: transformers' own InternVL pipeline on the same checkpoint.

Chat template (transformers), tiling and normalisation (``GotOcr2ImageProcessorPil``), prompt
expansion (``InternVLProcessor``), and greedy decoding (``InternVLForConditionalGeneration``).
Nothing here imports DvD code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class OracleAnswer:
    token_ids: list[int]
    text: str
    num_visual_tokens: int
    num_prompt_tokens: int
    margins: list[float]  # top-1 minus top-2 logit at each generated step
    logprobs: torch.Tensor  # [steps, vocab]: log_softmax of the raw logits at each step


class TransformersOracle:
    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration, InternVLProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        self.model = InternVLForConditionalGeneration.from_pretrained(
            str(checkpoint), dtype=torch.float32
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(str(checkpoint))

        # InternVLProcessor insists on checking a video processor class, which needs torchvision;
        # we give it none, so skip that type check (only the check, not the processing).
        class _Processor(InternVLProcessor):
            def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> None:
                return None

        self.processor = _Processor(
            image_processor=image_processor,
            tokenizer=self.tokenizer,
            image_seq_length=256,
            chat_template=self.tokenizer.chat_template,
        )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        max_new_tokens: int,
        tools: list[dict[str, Any]] | None = None,
        **image_options: Any,
    ) -> OracleAnswer:
        """Greedy answer; {"type": "image"} parts in ``messages`` match ``images`` in order;
        ``tools`` (OpenAI function definitions) go to the chat template; ``image_options``
        to the image processor (``crop_to_patches=False``: one tile per image)."""
        text = self.processor.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(
            text=[text], images=images or None, return_tensors="pt", **image_options
        )
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
        prompt_len = inputs["input_ids"].shape[1]
        token_ids = out.sequences[0, prompt_len:].tolist()
        margins = []
        for scores in out.scores:
            top2 = scores[0].topk(2).values
            margins.append(float(top2[0] - top2[1]))
        return OracleAnswer(
            token_ids=token_ids,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            num_visual_tokens=int((inputs["input_ids"] == self.image_token_id).sum()),
            num_prompt_tokens=prompt_len,
            margins=margins,
            logprobs=torch.log_softmax(torch.cat(out.logits).float(), dim=-1),
        )


# ---- video, as the InternVL3.5 model card reads it ------------------------------------------


def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """The model card's frame sampling, as published (without a bound: the whole video)."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array(
        [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]
    )


def load_video_frames(data: bytes, num_segments: int) -> tuple[list[Image.Image], list[int]]:
    """The model card's ``load_video`` up to the tiles: every frame decoded (PyAV in place of
    decord), ``get_index`` over them, each sampled frame as an RGB image. One tile per frame
    is the image processor's job (``crop_to_patches=False``: a bicubic resize to 448)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    indices = get_index(None, fps, len(frames) - 1, first_idx=0, num_segments=num_segments)
    return [Image.fromarray(frames[i]).convert("RGB") for i in indices], indices.tolist()


def video_prompt_parts(num_frames: int) -> list[dict[str, Any]]:
    """The model card's video prefix, ``Frame{i+1}: <image>\n`` per frame, as content parts
    for the chat template (which renders an image part followed by a newline)."""
    parts: list[dict[str, Any]] = []
    for i in range(num_frames):
        parts += [{"type": "text", "text": f"Frame{i + 1}: "}, {"type": "image"}]
    return parts


def to_oracle_messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages whose image parts hold PIL images (key ``pil``) -> oracle form."""
    converted, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    parts.append({"type": "image"})
                    images.append(part["pil"])
                else:
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        entry = {"role": message["role"], "content": content}
        if message.get("tool_calls"):
            # transformers' convention: a call's arguments are an object, not a JSON string.
            entry["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": json.loads(args)}}
                if isinstance(args := call["function"]["arguments"], str)
                else call
                for call in message["tool_calls"]
            ]
        if "tool_call_id" in message:
            entry["tool_call_id"] = message["tool_call_id"]
        converted.append(entry)
    return converted, images
