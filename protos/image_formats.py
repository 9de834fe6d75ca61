"""The image formats the vision service accepts, by Pillow's format names.

Shared so that the language service, reading an image's header to count its tiles, lets only
these Pillow plugins parse request bytes; an image of any other format is refused by the
vision service, whatever the language service counted for it.
"""

from __future__ import annotations

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
