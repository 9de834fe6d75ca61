"""The embedding codec: round trips, chunk boundaries, and refusal of inconsistent input."""

from __future__ import annotations

import pytest
import torch

from protos import codec
from protos.dvd.v1 import vision_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, codec.MAX_CHUNK_BYTES])
def test_round_trip(dtype, chunk_bytes):
    tensor = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    assembler = codec.EmbeddingAssembler(tuple(tensor.shape), codec.wire_dtype(dtype))
    chunks = list(codec.encode_chunks(tensor, chunk_bytes))
    assert all(len(data) <= chunk_bytes for _, data in chunks)
    for offset, data in chunks:
        assembler.add(offset, data)
    out = assembler.tensor()
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_bytes_are_little_endian_row_major():
    tensor = torch.tensor([[1.0, 2.0], [3.0, -0.5]], dtype=torch.float32)
    ((offset, data),) = codec.encode_chunks(tensor)
    import struct

    assert offset == 0
    assert data == struct.pack("<4f", 1.0, 2.0, 3.0, -0.5)


def test_non_contiguous_input_is_sent_row_major():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    data = b"".join(d for _, d in codec.encode_chunks(tensor))
    out = codec.decode_tensor(data, (4, 3), vision_pb2.DTYPE_FLOAT32)
    assert torch.equal(out, tensor)


def test_large_tensor_is_split_at_the_chunk_limit():
    tensor = torch.zeros(3 * 1024 * 1024 // 4 * 3, dtype=torch.float32)  # 9 MiB
    sizes = [len(d) for _, d in codec.encode_chunks(tensor, codec.MAX_CHUNK_BYTES)]
    assert sizes == [4 * 1024 * 1024, 4 * 1024 * 1024, 1024 * 1024]


def test_swap_bytes_matches_big_endian_layout():
    flat = torch.tensor([1.5, -2.25], dtype=torch.float32)
    swapped = codec.swap_bytes(flat)
    import struct

    assert swapped.view(torch.uint8).numpy().tobytes() == struct.pack(">2f", 1.5, -2.25)
    assert torch.equal(codec.swap_bytes(swapped), flat)
    bf16 = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    assert torch.equal(codec.swap_bytes(codec.swap_bytes(bf16)), bf16)


def test_incomplete_payload_is_refused():
    assembler = codec.EmbeddingAssembler((2, 2), vision_pb2.DTYPE_FLOAT32)
    assembler.add(0, b"\x00" * 8)
    assert not assembler.complete
    with pytest.raises(codec.CodecError, match="received 8 of 16"):
        assembler.tensor()


def test_out_of_order_or_overflowing_chunks_are_refused():
    assembler = codec.EmbeddingAssembler((2, 2), vision_pb2.DTYPE_FLOAT32)
    with pytest.raises(codec.CodecError, match="expected 0"):
        assembler.add(8, b"\x00" * 8)
    assembler.add(0, b"\x00" * 8)
    with pytest.raises(codec.CodecError, match="ends at byte 20"):
        assembler.add(8, b"\x00" * 12)


def test_unknown_dtypes_are_refused():
    with pytest.raises(codec.CodecError):
        codec.wire_dtype(torch.int64)
    with pytest.raises(codec.CodecError):
        codec.EmbeddingAssembler((1,), vision_pb2.DTYPE_UNSPECIFIED)
    with pytest.raises(codec.CodecError):
        list(codec.encode_chunks(torch.zeros(2), chunk_bytes=codec.MAX_CHUNK_BYTES + 1))
