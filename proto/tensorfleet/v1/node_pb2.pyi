from tensorfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_SOURCE_UNSPECIFIED: _ClassVar[WeightSource]
    WEIGHT_SOURCE_LOCAL_DIR: _ClassVar[WeightSource]
    WEIGHT_SOURCE_COORDINATOR: _ClassVar[WeightSource]
WEIGHT_SOURCE_UNSPECIFIED: WeightSource
WEIGHT_SOURCE_LOCAL_DIR: WeightSource
WEIGHT_SOURCE_COORDINATOR: WeightSource

class TensorParallelGroup(_message.Message):
    __slots__ = ("store_address", "store_prefix", "world_size", "backend", "members")
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    store_address: str
    store_prefix: str
    world_size: int
    backend: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, store_address: _Optional[str] = ..., store_prefix: _Optional[str] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class LocalRank(_message.Message):
    __slots__ = ("device_index", "tp_rank")
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    device_index: int
    tp_rank: int
    def __init__(self, device_index: _Optional[int] = ..., tp_rank: _Optional[int] = ...) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("epoch", "model", "stage_index", "num_stages", "layers", "dtype", "group", "local_ranks", "num_slots", "max_seq_len", "next_stage_address", "weight_source", "codec", "codec_min_tokens", "tp_codec", "tp_codec_min_elements", "data_key")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TP_CODEC_FIELD_NUMBER: _ClassVar[int]
    TP_CODEC_MIN_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    model: str
    stage_index: int
    num_stages: int
    layers: _common_pb2.LayerRange
    dtype: _common_pb2.DType
    group: TensorParallelGroup
    local_ranks: _containers.RepeatedCompositeFieldContainer[LocalRank]
    num_slots: int
    max_seq_len: int
    next_stage_address: str
    weight_source: WeightSource
    codec: str
    codec_min_tokens: int
    tp_codec: str
    tp_codec_min_elements: int
    data_key: str
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., model: _Optional[str] = ..., stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., layers: _Optional[_Union[_common_pb2.LayerRange, _Mapping]] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., group: _Optional[_Union[TensorParallelGroup, _Mapping]] = ..., local_ranks: _Optional[_Iterable[_Union[LocalRank, _Mapping]]] = ..., num_slots: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., next_stage_address: _Optional[str] = ..., weight_source: _Optional[_Union[WeightSource, str]] = ..., codec: _Optional[str] = ..., codec_min_tokens: _Optional[int] = ..., tp_codec: _Optional[str] = ..., tp_codec_min_elements: _Optional[int] = ..., data_key: _Optional[str] = ...) -> None: ...

class LoadStageResponse(_message.Message):
    __slots__ = ("epoch", "weight_bytes", "kv_cache_bytes", "load_seconds", "stage_address", "fetched_bytes")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    weight_bytes: int
    kv_cache_bytes: int
    load_seconds: float
    stage_address: str
    fetched_bytes: int
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ..., stage_address: _Optional[str] = ..., fetched_bytes: _Optional[int] = ...) -> None: ...

class SequenceStep(_message.Message):
    __slots__ = ("request_id", "slot", "start", "token_ids", "sampling", "seed", "after_step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AFTER_STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slot: int
    start: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    after_step: int
    def __init__(self, request_id: _Optional[str] = ..., slot: _Optional[int] = ..., start: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., after_step: _Optional[int] = ...) -> None: ...

class StepMessage(_message.Message):
    __slots__ = ("epoch", "step_id", "sequences", "hidden", "encoded_hidden", "shared_hidden")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ENCODED_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SHARED_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    step_id: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceStep]
    hidden: _common_pb2.Tensor
    encoded_hidden: _common_pb2.EncodedTensor
    shared_hidden: SharedSlot
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., step_id: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceStep, _Mapping]]] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., encoded_hidden: _Optional[_Union[_common_pb2.EncodedTensor, _Mapping]] = ..., shared_hidden: _Optional[_Union[SharedSlot, _Mapping]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("request_id", "slot", "token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slot: int
    token_id: int
    def __init__(self, request_id: _Optional[str] = ..., slot: _Optional[int] = ..., token_id: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("epoch", "step_id", "tokens", "error", "shared_tokens")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHARED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    step_id: int
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    error: str
    shared_tokens: SharedSlot
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., step_id: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., error: _Optional[str] = ..., shared_tokens: _Optional[_Union[SharedSlot, _Mapping]] = ...) -> None: ...

class SharedSlot(_message.Message):
    __slots__ = ("ring_id", "index", "rows")
    RING_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ring_id: int
    index: int
    rows: int
    def __init__(self, ring_id: _Optional[int] = ..., index: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class SharedBuffer(_message.Message):
    __slots__ = ("kind", "shape", "dtype", "path", "ipc_handle", "storage_bytes", "storage_offset", "ref_counter_handle", "ref_counter_offset", "ipc_event", "ipc_event_sync", "slot_events", "check_values")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IPC_EVENT_FIELD_NUMBER: _ClassVar[int]
    IPC_EVENT_SYNC_FIELD_NUMBER: _ClassVar[int]
    SLOT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    CHECK_VALUES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _common_pb2.DType
    path: str
    ipc_handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    ipc_event: bytes
    ipc_event_sync: bool
    slot_events: _containers.RepeatedScalarFieldContainer[bytes]
    check_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, kind: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., path: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., storage_offset: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., ipc_event: _Optional[bytes] = ..., ipc_event_sync: _Optional[bool] = ..., slot_events: _Optional[_Iterable[bytes]] = ..., check_values: _Optional[_Iterable[float]] = ...) -> None: ...

class ShareRequest(_message.Message):
    __slots__ = ("epoch", "ring_id", "host_id", "device_id", "hidden")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RING_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    ring_id: int
    host_id: str
    device_id: str
    hidden: SharedBuffer
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., ring_id: _Optional[int] = ..., host_id: _Optional[str] = ..., device_id: _Optional[str] = ..., hidden: _Optional[_Union[SharedBuffer, _Mapping]] = ...) -> None: ...

class ShareResponse(_message.Message):
    __slots__ = ("accepted", "reason", "tokens")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    tokens: SharedBuffer
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., tokens: _Optional[_Union[SharedBuffer, _Mapping]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...
