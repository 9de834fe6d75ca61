"""The embedding codec: round trips, chunk boundaries, and refusal of inconsistent input."""

from __future__ import annotations

import pytest
import torch

from protos import codec
from protos.dvd.v1 import vision_pb2


def encode_chunks(tensor, chunk_bytes=codec.DEFAULT_CHUNK_BYTES, image_index=0):
    """(offset, bytes) of each chunk, through the production path: the serialized stream
    messages the vision service sends, read back as the language service reads them."""
    chunks = []
    for raw in codec.encode_chunk_messages(tensor, image_index, chunk_bytes):
        index, offset, data = codec.parse_response(raw)
        assert index == image_index
        chunks.append((offset, bytes(data)))
    return chunks


def decode(chunks, shape, wire):
    assembler = codec.EmbeddingAssembler(shape, wire)
    for offset, data in chunks:
        assembler.add(offset, data)
    return assembler.tensor()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, codec.MAX_CHUNK_BYTES])
def test_round_trip(dtype, chunk_bytes):
    tensor = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    assembler = codec.EmbeddingAssembler(tuple(tensor.shape), codec.wire_dtype(dtype))
    chunks = list(encode_chunks(tensor, chunk_bytes))
    assert all(len(data) <= chunk_bytes for _, data in chunks)
    for offset, data in chunks:
        assembler.add(offset, data)
    out = assembler.tensor()
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_bytes_are_little_endian_row_major():
    tensor = torch.tensor([[1.0, 2.0], [3.0, -0.5]], dtype=torch.float32)
    ((offset, data),) = encode_chunks(tensor)
    import struct

    assert offset == 0
    assert data == struct.pack("<4f", 1.0, 2.0, 3.0, -0.5)


def test_non_contiguous_input_is_sent_row_major():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    out = decode(encode_chunks(tensor), (4, 3), vision_pb2.DTYPE_FLOAT32)
    assert torch.equal(out, tensor)


def test_large_tensor_is_split_at_the_chunk_limit():
    tensor = torch.zeros(3 * 1024 * 1024 // 4 * 3, dtype=torch.float32)  # 9 MiB
    sizes = [len(d) for _, d in encode_chunks(tensor, codec.MAX_CHUNK_BYTES)]
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
        list(codec.encode_chunk_messages(torch.zeros(2), 0, codec.MAX_CHUNK_BYTES + 1))
    with pytest.raises(codec.CodecError):
        list(codec.encode_chunk_messages(torch.zeros(2, dtype=torch.int64), 0))


@pytest.mark.parametrize(("index", "offset"), [(0, 0), (3, 0), (0, 4096), (7, 2**33 + 5)])
def test_fast_chunk_messages_are_plain_protobuf(index, offset):
    data = bytes(range(256)) * 37
    raw = codec.chunk_message(index, offset, data)
    parsed = vision_pb2.EncodeResponse.FromString(raw)  # any protobuf reader understands it
    assert parsed.WhichOneof("payload") == "chunk"
    assert (parsed.chunk.image_index, parsed.chunk.offset, parsed.chunk.data) == (
        index,
        offset,
        data,
    )
    # ...and the fast reader understands protobuf's own serialization.
    official = vision_pb2.EncodeResponse(
        chunk=vision_pb2.EmbeddingChunk(image_index=index, offset=offset, data=data)
    ).SerializeToString()
    got_index, got_offset, view = codec.parse_response(official)
    assert (got_index, got_offset, bytes(view)) == (index, offset, data)
    assert isinstance(view, memoryview)  # no copy of the payload


def test_parse_response_returns_headers():
    header = vision_pb2.ImageHeader(image_index=2, num_tiles=3, tokens_per_tile=[256, 64, 256])
    raw = vision_pb2.EncodeResponse(header=header).SerializeToString()
    assert codec.parse_response(raw) == header
    with pytest.raises(codec.CodecError):
        codec.parse_response(vision_pb2.EncodeResponse().SerializeToString())
    with pytest.raises(codec.CodecError):
        codec.parse_response(codec.chunk_message(1, 2, b"abc")[:-1])


def test_chunk_messages_reassemble_a_tensor():
    tensor = torch.randn(300, 64).to(torch.bfloat16)
    assembler = codec.EmbeddingAssembler(tuple(tensor.shape), vision_pb2.DTYPE_BFLOAT16)
    for raw in codec.encode_chunk_messages(tensor, image_index=1, chunk_bytes=10_000):
        index, offset, data = codec.parse_response(raw)
        assert index == 1
        assembler.add(offset, data)
    assert torch.equal(assembler.tensor(), tensor)


def test_hand_written_field_tags_match_the_proto():
    """The fast chunk reader/writer hard-codes field numbers and wire types; they must be the
    ones vision.proto declares (a renumbered field would otherwise corrupt every stream)."""
    length_delimited, varint = 2, 0
    response = vision_pb2.EncodeResponse.DESCRIPTOR.fields_by_name
    chunk = vision_pb2.EmbeddingChunk.DESCRIPTOR.fields_by_name
    assert response["chunk"].number << 3 | length_delimited == codec._RESPONSE_CHUNK_TAG
    assert chunk["image_index"].number << 3 | varint == codec._CHUNK_INDEX_TAG
    assert chunk["offset"].number << 3 | varint == codec._CHUNK_OFFSET_TAG
    assert chunk["data"].number << 3 | length_delimited == codec._CHUNK_DATA_TAG
    assert set(chunk) == {"image_index", "offset", "data"}, "a new chunk field needs the codec"


MALFORMED_FRAMES = [
    ("truncated length varint", b"\x12\x80"),
    ("length varint over 10 bytes", b"\x12" + b"\xff" * 11),
    ("truncated image index", b"\x12\x02\x08\x80"),
    ("truncated offset", b"\x12\x03\x08\x01\x10"),
    ("data longer than the message", b"\x12\x03\x1a\x05a"),
    ("data length varint over 10 bytes", b"\x12\x0c\x1a" + b"\xff" * 11),
    ("length beyond the frame", b"\x12\x7f\x08\x01"),
    ("unknown field", b"\x12\x02\x20\x01"),
    ("undecodable header", b"\x0a\xff"),
    ("header field truncated", b"\x0a\x05\x08\x01"),
]


@pytest.mark.parametrize(
    "raw", [f[1] for f in MALFORMED_FRAMES], ids=[f[0] for f in MALFORMED_FRAMES]
)
def test_malformed_frames_raise_codec_errors(raw):
    with pytest.raises(codec.CodecError):
        codec.parse_response(raw)


def test_random_and_truncated_frames_only_ever_raise_codec_errors():
    """Whatever bytes arrive, the reader either parses them or raises CodecError (never an
    IndexError or a protobuf error that would surface as a 500)."""
    import contextlib
    import random

    rng = random.Random(7)
    good = codec.chunk_message(3, 2**40, bytes(range(200)))
    frames = [good[:cut] for cut in range(len(good))]
    frames += [bytes([0x12]) + rng.randbytes(rng.randrange(0, 24)) for _ in range(3000)]
    frames += [rng.randbytes(rng.randrange(1, 24)) for _ in range(3000)]
    for raw in frames:
        with contextlib.suppress(codec.CodecError):
            codec.parse_response(raw)


def test_tensor_from_bytes_is_a_copy_of_exactly_those_bytes():
    """The rows outlive the buffer they were read from (a shared-memory range is reused)."""
    rows = torch.randn(7, 33).to(torch.bfloat16)
    raw = codec.little_endian_bytes(rows).clone()
    out = codec.tensor_from_bytes(raw, (7, 33), codec.wire_dtype(torch.bfloat16))
    raw.zero_()
    assert out.dtype == torch.bfloat16 and out.shape == (7, 33)
    assert torch.equal(out.view(torch.int16), rows.view(torch.int16))
