"""``rgb_pixels``: Pillow's own pixel memory as a numpy view, equal to ``np.asarray``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vision_server.pixels import rgb_pixels


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (448, 448), (897, 613), (1920, 1080)])
def test_the_view_has_the_pixels_numpy_copies(size):
    image = _image(*size, seed=sum(size))
    resized = image.resize((size[0] // 2 + 1, size[1] // 2 + 1), Image.Resampling.BICUBIC)
    for source in (image, resized):
        with rgb_pixels(source) as pixels:
            assert pixels.shape == (source.height, source.width, 3)
            assert pixels.dtype == np.uint8
            # A view of Pillow's 4-byte pixels, not a copy.
            assert not pixels.flags.owndata and pixels.strides == (4 * source.width, 4, 1)
            assert np.array_equal(pixels, np.asarray(source))


def test_an_image_in_several_blocks_is_copied():
    """Pillow stores tens of megapixels in several blocks, which it cannot export as one."""
    image = Image.new("RGB", (4000, 3000), (10, 20, 30))
    image.putpixel((3999, 2999), (1, 2, 3))
    with rgb_pixels(image) as pixels:
        assert pixels.strides == (3 * 4000, 3, 1)  # np.asarray's own copy
        assert tuple(pixels[0, 0]) == (10, 20, 30) and tuple(pixels[-1, -1]) == (1, 2, 3)


def test_other_modes_are_copied():
    grey = Image.new("L", (5, 4), 7)
    with rgb_pixels(grey) as pixels:
        assert pixels.shape == (4, 5) and int(pixels[0, 0]) == 7
