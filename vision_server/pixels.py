"""An RGB Pillow image's pixels as a numpy view, without copying them.

``np.asarray(image)`` goes through ``Image.tobytes``, which copies every pixel twice while
holding the GIL: time, and memory under a media worker's limit (tiles are cut in the media
worker processes; when they were cut in the server, this was also the largest share of
preprocessing that blocked its event loop and pass launcher). Pillow also exports its own pixel
memory through the Arrow C data interface (``__arrow_c_array__``, a stable ABI): an RGB image
is a list of 4-byte pixels (R, G, B, padding) in one block. ``rgb_pixels`` reads that block as
an ``[H, W, 3]`` view, and the tiles are then copied out of it by numpy, which releases the GIL.
Images that Pillow stores in several blocks (tens of megapixels) cannot be exported that way
and are copied as before.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import numpy as np
from PIL import Image


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _exported_pixels(image: Image.Image, schema: object, array: object) -> np.ndarray | None:
    """The ``[H, W, 4]`` view of an exported RGB image, or None if the export is not the
    one-block list of 4-byte pixels this reads."""
    schema_struct = _ArrowSchema.from_address(_capsule_pointer(schema, b"arrow_schema"))
    array_struct = _ArrowArray.from_address(_capsule_pointer(array, b"arrow_array"))
    width, height = image.size
    if schema_struct.format != b"+w:4" or schema_struct.n_children != 1:
        return None
    if schema_struct.children[0].contents.format != b"C":  # uint8 values
        return None
    if array_struct.length != width * height or array_struct.offset or array_struct.n_children != 1:
        return None
    values = array_struct.children[0].contents
    if values.length != width * height * 4 or values.offset or values.n_buffers != 2:
        return None
    address = values.buffers[1]
    if not address:
        return None
    memory = (ctypes.c_uint8 * (height * width * 4)).from_address(address)
    return np.ctypeslib.as_array(memory).reshape(height, width, 4)


@contextlib.contextmanager
def rgb_pixels(image: Image.Image) -> Iterator[np.ndarray]:
    """``image``'s pixels as ``[H, W, 3]`` uint8, valid inside the ``with`` block only: a view
    of Pillow's memory when it can be exported in one block, else a copy. Read-only use."""
    schema = array = pixels = None
    if image.mode == "RGB" and image.width and image.height:
        try:
            schema, array = image.__arrow_c_array__()
        except ValueError:  # stored in several blocks
            pass
        else:
            pixels = _exported_pixels(image, schema, array)
    if pixels is None:
        yield np.asarray(image)
        return
    # The capsules (and the image) keep the memory alive while the view is used.
    yield pixels[:, :, :3]
    del pixels, schema, array
