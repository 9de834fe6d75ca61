"""Tensor <-> bytes for the vision stream: the only code that knows the embedding byte layout.

Layout: a row-major (C-contiguous) tensor of one of the ``DType`` values, little-endian,
sent as raw bytes in chunks of at most ``MAX_CHUNK_BYTES``. No pickle, no ``torch.load``: the
receiver trusts nothing but the header's dtype and shape, and checks that the bytes add up.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from protos.dvd.v1 import vision_pb2

# Messages well below gRPC's default 4 MiB receive limit would need many more round trips;
# 1-4 MiB chunks are the measured sweet spot for grpcio throughput.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024

_TORCH_TO_WIRE: dict[torch.dtype, vision_pb2.DType] = {
    torch.float32: vision_pb2.DTYPE_FLOAT32,
    torch.bfloat16: vision_pb2.DTYPE_BFLOAT16,
    torch.float16: vision_pb2.DTYPE_FLOAT16,
}
_WIRE_TO_TORCH: dict[int, torch.dtype] = {int(w): dtype for dtype, w in _TORCH_TO_WIRE.items()}


class CodecError(ValueError):
    """The bytes received do not form the tensor the header announced."""


def wire_dtype(dtype: torch.dtype) -> vision_pb2.DType:
    """The ``DType`` enum value for a torch dtype (float32, bfloat16, float16)."""
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise CodecError(
            f"dtype {dtype} cannot be sent; use float32, bfloat16 or float16"
        ) from None


def torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype for a ``DType`` enum value."""
    try:
        return _WIRE_TO_TORCH[wire]
    except KeyError:
        raise CodecError(f"unknown embedding dtype {wire}") from None


def swap_bytes(flat: torch.Tensor) -> torch.Tensor:
    """Reverse the byte order of each element of a 1-D tensor (for big-endian hosts)."""
    int_view = {2: torch.int16, 4: torch.int32}[flat.element_size()]
    swapped = flat.view(int_view).numpy().byteswap()
    return torch.from_numpy(swapped).view(flat.dtype)


def _as_little_endian_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if sys.byteorder != "little":
        flat = swap_bytes(flat)
    return memoryview(flat.view(torch.uint8).numpy().data)


def encode_chunks(
    tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Split a tensor into ``(offset, bytes)`` chunks of at most ``chunk_bytes`` bytes.

    Chunk boundaries need not fall on element boundaries; the receiver reassembles by offset.
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk size must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    wire_dtype(tensor.dtype)
    raw = _as_little_endian_bytes(tensor)
    for offset in range(0, len(raw), chunk_bytes):
        yield offset, bytes(raw[offset : offset + chunk_bytes])


def tensor_nbytes(num_rows: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of a ``[num_rows, hidden_size]`` tensor of ``dtype``."""
    return num_rows * hidden_size * torch.empty((), dtype=dtype).element_size()


class EmbeddingAssembler:
    """Collects one image's chunks into a preallocated buffer and returns the tensor.

    ``shape`` and ``dtype`` come from the image header; every byte must arrive exactly once.
    """

    def __init__(self, shape: tuple[int, ...], wire: int) -> None:
        self.dtype = torch_dtype(wire)
        self.shape = shape
        count = 1
        for dim in shape:
            if dim < 0:
                raise CodecError(f"negative dimension in shape {shape}")
            count *= dim
        self.num_bytes = count * torch.empty((), dtype=self.dtype).element_size()
        self._buffer = bytearray(self.num_bytes)
        self._received = 0
        self._next_offset = 0

    @property
    def complete(self) -> bool:
        return self._received == self.num_bytes

    def add(self, offset: int, data: bytes) -> None:
        """Place one chunk. Chunks must arrive in order (gRPC streams preserve it)."""
        if offset != self._next_offset:
            raise CodecError(f"chunk at offset {offset}, expected {self._next_offset}")
        end = offset + len(data)
        if end > self.num_bytes:
            raise CodecError(f"chunk ends at byte {end}, tensor has {self.num_bytes}")
        if len(data) > MAX_CHUNK_BYTES:
            raise CodecError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
        self._buffer[offset:end] = data
        self._received += len(data)
        self._next_offset = end

    def tensor(self) -> torch.Tensor:
        """The assembled tensor (raises unless every byte has arrived)."""
        if not self.complete:
            raise CodecError(f"received {self._received} of {self.num_bytes} embedding bytes")
        if self.num_bytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        flat = torch.frombuffer(self._buffer, dtype=self.dtype)
        if sys.byteorder != "little":
            flat = swap_bytes(flat)
        return flat.reshape(self.shape)


def decode_tensor(data: bytes, shape: tuple[int, ...], wire: int) -> torch.Tensor:
    """Decode a whole tensor from one buffer (convenience for tests and small payloads)."""
    assembler = EmbeddingAssembler(shape, wire)
    for offset in range(0, len(data), MAX_CHUNK_BYTES):
        assembler.add(offset, data[offset : offset + MAX_CHUNK_BYTES])
    return assembler.tensor()
