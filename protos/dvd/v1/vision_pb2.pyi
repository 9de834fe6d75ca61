from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class VirMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIR_MODE_UNSPECIFIED: _ClassVar[VirMode]
    VIR_MODE_AUTO: _ClassVar[VirMode]
    VIR_MODE_OFF: _ClassVar[VirMode]
    VIR_MODE_MAX: _ClassVar[VirMode]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_REQUEST: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_IMAGE: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_VIDEO: _ClassVar[ErrorCode]
    ERROR_CODE_TOO_MANY_IMAGES: _ClassVar[ErrorCode]
    ERROR_CODE_OVERLOADED: _ClassVar[ErrorCode]
    ERROR_CODE_OUT_OF_MEMORY: _ClassVar[ErrorCode]
    ERROR_CODE_ENCODE_FAILED: _ClassVar[ErrorCode]
    ERROR_CODE_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
VIR_MODE_UNSPECIFIED: VirMode
VIR_MODE_AUTO: VirMode
VIR_MODE_OFF: VirMode
VIR_MODE_MAX: VirMode
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_REQUEST: ErrorCode
ERROR_CODE_INVALID_IMAGE: ErrorCode
ERROR_CODE_INVALID_VIDEO: ErrorCode
ERROR_CODE_TOO_MANY_IMAGES: ErrorCode
ERROR_CODE_OVERLOADED: ErrorCode
ERROR_CODE_OUT_OF_MEMORY: ErrorCode
ERROR_CODE_ENCODE_FAILED: ErrorCode
ERROR_CODE_UNAVAILABLE: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class ErrorDetail(_message.Message):
    __slots__ = ("code", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    field: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., field: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "max_tiles", "max_visual_tokens")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    MAX_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    max_tiles: int
    max_visual_tokens: int
    def __init__(self, data: _Optional[bytes] = ..., max_tiles: _Optional[int] = ..., max_visual_tokens: _Optional[int] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("data", "num_frames")
    DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    num_frames: int
    def __init__(self, data: _Optional[bytes] = ..., num_frames: _Optional[int] = ...) -> None: ...

class EncodeOptions(_message.Message):
    __slots__ = ("max_tiles", "vir_mode", "vir_threshold", "max_visual_tokens")
    MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    VIR_MODE_FIELD_NUMBER: _ClassVar[int]
    VIR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tiles: int
    vir_mode: VirMode
    vir_threshold: float
    max_visual_tokens: int
    def __init__(self, max_tiles: _Optional[int] = ..., vir_mode: _Optional[_Union[VirMode, str]] = ..., vir_threshold: _Optional[float] = ..., max_visual_tokens: _Optional[int] = ...) -> None: ...

class SharedMemoryTarget(_message.Message):
    __slots__ = ("segment", "token", "offset", "capacity", "generation")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    segment: str
    token: bytes
    offset: int
    capacity: int
    generation: int
    def __init__(self, segment: _Optional[str] = ..., token: _Optional[bytes] = ..., offset: _Optional[int] = ..., capacity: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "images", "options", "shared_memory", "videos")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: EncodeOptions
    shared_memory: SharedMemoryTarget
    videos: _containers.RepeatedCompositeFieldContainer[Video]
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedMemoryTarget, _Mapping]] = ..., videos: _Optional[_Iterable[_Union[Video, _Mapping]]] = ...) -> None: ...

class VideoFrames(_message.Message):
    __slots__ = ("video_index", "frame_numbers", "total_frames", "duration_s", "fps")
    VIDEO_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    video_index: int
    frame_numbers: _containers.RepeatedScalarFieldContainer[int]
    total_frames: int
    duration_s: float
    fps: float
    def __init__(self, video_index: _Optional[int] = ..., frame_numbers: _Optional[_Iterable[int]] = ..., total_frames: _Optional[int] = ..., duration_s: _Optional[float] = ..., fps: _Optional[float] = ...) -> None: ...

class ImageHeader(_message.Message):
    __slots__ = ("image_index", "num_tiles", "tokens_per_tile", "num_visual_tokens", "hidden_size", "dtype", "num_bytes", "grid_columns", "grid_rows", "has_thumbnail", "queue_ms", "encode_ms", "vir_mode", "full_tokens_per_tile", "shared_memory_offset", "video", "from_cache", "checkpoint_digest")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    NUM_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRID_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    HAS_THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    VIR_MODE_FIELD_NUMBER: _ClassVar[int]
    FULL_TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    num_tiles: int
    tokens_per_tile: _containers.RepeatedScalarFieldContainer[int]
    num_visual_tokens: int
    hidden_size: int
    dtype: DType
    num_bytes: int
    grid_columns: int
    grid_rows: int
    has_thumbnail: bool
    queue_ms: float
    encode_ms: float
    vir_mode: VirMode
    full_tokens_per_tile: int
    shared_memory_offset: int
    video: VideoFrames
    from_cache: bool
    checkpoint_digest: str
    def __init__(self, image_index: _Optional[int] = ..., num_tiles: _Optional[int] = ..., tokens_per_tile: _Optional[_Iterable[int]] = ..., num_visual_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., num_bytes: _Optional[int] = ..., grid_columns: _Optional[int] = ..., grid_rows: _Optional[int] = ..., has_thumbnail: _Optional[bool] = ..., queue_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., vir_mode: _Optional[_Union[VirMode, str]] = ..., full_tokens_per_tile: _Optional[int] = ..., shared_memory_offset: _Optional[int] = ..., video: _Optional[_Union[VideoFrames, _Mapping]] = ..., from_cache: _Optional[bool] = ..., checkpoint_digest: _Optional[str] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("image_index", "offset", "data")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    offset: int
    data: bytes
    def __init__(self, image_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ImageHeader
    chunk: EmbeddingChunk
    def __init__(self, header: _Optional[_Union[ImageHeader, _Mapping]] = ..., chunk: _Optional[_Union[EmbeddingChunk, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("shared_memory_probe",)
    SHARED_MEMORY_PROBE_FIELD_NUMBER: _ClassVar[int]
    shared_memory_probe: str
    def __init__(self, shared_memory_probe: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "checkpoint_layout", "hidden_size", "dtype", "tile_size", "tokens_per_tile", "compressed_tokens_per_tile", "default_max_tiles", "max_tiles_limit", "use_thumbnail", "vir_available", "image_start_token", "image_context_token", "image_end_token", "device", "checkpoint_digest", "embedding_cache_bytes", "shared_memory_nonce")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    USE_THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    VIR_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CONTEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_NONCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    checkpoint_layout: str
    hidden_size: int
    dtype: DType
    tile_size: int
    tokens_per_tile: int
    compressed_tokens_per_tile: int
    default_max_tiles: int
    max_tiles_limit: int
    use_thumbnail: bool
    vir_available: bool
    image_start_token: str
    image_context_token: str
    image_end_token: str
    device: str
    checkpoint_digest: str
    embedding_cache_bytes: int
    shared_memory_nonce: bytes
    def __init__(self, model_id: _Optional[str] = ..., checkpoint_layout: _Optional[str] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., tile_size: _Optional[int] = ..., tokens_per_tile: _Optional[int] = ..., compressed_tokens_per_tile: _Optional[int] = ..., default_max_tiles: _Optional[int] = ..., max_tiles_limit: _Optional[int] = ..., use_thumbnail: _Optional[bool] = ..., vir_available: _Optional[bool] = ..., image_start_token: _Optional[str] = ..., image_context_token: _Optional[str] = ..., image_end_token: _Optional[str] = ..., device: _Optional[str] = ..., checkpoint_digest: _Optional[str] = ..., embedding_cache_bytes: _Optional[int] = ..., shared_memory_nonce: _Optional[bytes] = ...) -> None: ...
