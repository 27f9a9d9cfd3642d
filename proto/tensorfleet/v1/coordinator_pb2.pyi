from tensorfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_IDLE: _ClassVar[NodeState]
    NODE_STATE_LOADING: _ClassVar[NodeState]
    NODE_STATE_SERVING: _ClassVar[NodeState]
    NODE_STATE_SUSPECT: _ClassVar[NodeState]
    NODE_STATE_FAILED: _ClassVar[NodeState]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_IDLE: NodeState
NODE_STATE_LOADING: NodeState
NODE_STATE_SERVING: NodeState
NODE_STATE_SUSPECT: NodeState
NODE_STATE_FAILED: NodeState

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _common_pb2.TokenIds
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text_delta", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_delta: str
    finish_reason: FinishReason
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text_delta: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "info", "state", "last_heartbeat_age_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    info: _common_pb2.NodeInfo
    state: NodeState
    last_heartbeat_age_s: float
    def __init__(self, node_id: _Optional[str] = ..., info: _Optional[_Union[_common_pb2.NodeInfo, _Mapping]] = ..., state: _Optional[_Union[NodeState, str]] = ..., last_heartbeat_age_s: _Optional[float] = ...) -> None: ...

class StageMember(_message.Message):
    __slots__ = ("node_id", "device_index", "tp_rank")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device_index: int
    tp_rank: int
    def __init__(self, node_id: _Optional[str] = ..., device_index: _Optional[int] = ..., tp_rank: _Optional[int] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("index", "layers", "members", "address", "weight_bytes", "kv_cache_bytes", "num_slots", "slots_fit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    layers: _common_pb2.LayerRange
    members: _containers.RepeatedCompositeFieldContainer[StageMember]
    address: str
    weight_bytes: int
    kv_cache_bytes: int
    num_slots: int
    slots_fit: int
    def __init__(self, index: _Optional[int] = ..., layers: _Optional[_Union[_common_pb2.LayerRange, _Mapping]] = ..., members: _Optional[_Iterable[_Union[StageMember, _Mapping]]] = ..., address: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., num_slots: _Optional[int] = ..., slots_fit: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("epoch", "model", "nodes", "stages", "requests_running", "requests_waiting", "max_batch_size", "max_step_tokens", "micro_batches", "slots_free", "max_queue", "placement_changes", "unavailable_reason", "coordinator_run")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_CHANGES_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_RUN_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    model: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    requests_running: int
    requests_waiting: int
    max_batch_size: int
    max_step_tokens: int
    micro_batches: int
    slots_free: int
    max_queue: int
    placement_changes: _containers.RepeatedCompositeFieldContainer[PlacementChange]
    unavailable_reason: str
    coordinator_run: str
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., model: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., requests_running: _Optional[int] = ..., requests_waiting: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., micro_batches: _Optional[int] = ..., slots_free: _Optional[int] = ..., max_queue: _Optional[int] = ..., placement_changes: _Optional[_Iterable[_Union[PlacementChange, _Mapping]]] = ..., unavailable_reason: _Optional[str] = ..., coordinator_run: _Optional[str] = ...) -> None: ...

class PlacementChange(_message.Message):
    __slots__ = ("epoch", "kind", "nodes", "reason", "detected_at", "resumed_at", "requests_replayed", "layers_moved")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESUMED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_MOVED_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    kind: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    detected_at: float
    resumed_at: float
    requests_replayed: int
    layers_moved: int
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., kind: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., detected_at: _Optional[float] = ..., resumed_at: _Optional[float] = ..., requests_replayed: _Optional[int] = ..., layers_moved: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.NodeInfo
    def __init__(self, node: _Optional[_Union[_common_pb2.NodeInfo, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_ms", "heartbeat_timeout_ms", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    epoch: _common_pb2.PlacementEpoch
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ..., epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "devices", "links")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: _common_pb2.PlacementEpoch
    devices: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeviceInfo]
    links: _containers.RepeatedCompositeFieldContainer[LinkTraffic]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[_common_pb2.DeviceInfo, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkTraffic, _Mapping]]] = ...) -> None: ...

class LinkTraffic(_message.Message):
    __slots__ = ("peer_address", "codec", "stage_start", "stage_end", "messages", "raw_bytes", "wire_bytes")
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    STAGE_START_FIELD_NUMBER: _ClassVar[int]
    STAGE_END_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    peer_address: str
    codec: str
    stage_start: int
    stage_end: int
    messages: int
    raw_bytes: int
    wire_bytes: int
    def __init__(self, peer_address: _Optional[str] = ..., codec: _Optional[str] = ..., stage_start: _Optional[int] = ..., stage_end: _Optional[int] = ..., messages: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("epoch", "rejoin", "leave")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    epoch: _common_pb2.PlacementEpoch
    rejoin: bool
    leave: bool
    def __init__(self, epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ..., rejoin: _Optional[bool] = ..., leave: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("node_id", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: _common_pb2.PlacementEpoch
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[_Union[_common_pb2.PlacementEpoch, _Mapping]] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("name", "config_json", "tensors", "fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    fingerprint: str
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("node_id", "names")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("name", "offset", "data", "total")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    total: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total: _Optional[int] = ...) -> None: ...
