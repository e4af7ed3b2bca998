from baton.v1 import baton_pb2 as _baton_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype", "tensor_parallel_size")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tensor_parallel_size: int
    def __init__(self, num_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class KVShare(_message.Message):
    __slots__ = ("device_id", "shape", "dtype", "shm_path", "cuda_handle", "storage_size", "storage_offset", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "tensor_offset")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    CUDA_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shm_path: str
    cuda_handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    tensor_offset: int
    def __init__(self, device_id: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shm_path: _Optional[str] = ..., cuda_handle: _Optional[bytes] = ..., storage_size: _Optional[int] = ..., storage_offset: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: bool = ..., tensor_offset: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "max_tokens", "lease_ms", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    max_tokens: int
    lease_ms: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: KVTarget
    def __init__(self, target: _Optional[_Union[KVTarget, _Mapping]] = ...) -> None: ...

class ReceiveKVRequest(_message.Message):
    __slots__ = ("request_id", "prefill_node_id", "generation", "layout", "num_tokens", "block_ids", "transfer_tag", "lane", "shared", "first_block")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TAG_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_node_id: str
    generation: int
    layout: KVLayout
    num_tokens: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    transfer_tag: int
    lane: int
    shared: bool
    first_block: int
    def __init__(self, request_id: _Optional[str] = ..., prefill_node_id: _Optional[str] = ..., generation: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., num_tokens: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., transfer_tag: _Optional[int] = ..., lane: _Optional[int] = ..., shared: bool = ..., first_block: _Optional[int] = ...) -> None: ...

class KVWrittenRequest(_message.Message):
    __slots__ = ("request_id", "prefill_node_id", "ok", "bytes_written")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_node_id: str
    ok: bool
    bytes_written: int
    def __init__(self, request_id: _Optional[str] = ..., prefill_node_id: _Optional[str] = ..., ok: bool = ..., bytes_written: _Optional[int] = ...) -> None: ...

class KVWrittenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReceiveKVResponse(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class PullKVRequest(_message.Message):
    __slots__ = ("request_id", "prefill_node_id", "generation", "lane", "layout", "first_block", "block_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_node_id: str
    generation: int
    lane: int
    layout: KVLayout
    first_block: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prefill_node_id: _Optional[str] = ..., generation: _Optional[int] = ..., lane: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., first_block: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PullKVResponse(_message.Message):
    __slots__ = ("bytes_sent",)
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    def __init__(self, bytes_sent: _Optional[int] = ...) -> None: ...

class Resumed(_message.Message):
    __slots__ = ("token_ids", "text_chars")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_chars: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text_chars: _Optional[int] = ...) -> None: ...

class ContinueRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "first_token", "first_logprob", "sampling", "resumed", "forks", "prefill_here")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FORKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HERE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    first_logprob: float
    sampling: _baton_pb2.SamplingParams
    resumed: Resumed
    forks: _containers.RepeatedCompositeFieldContainer[_baton_pb2.SamplingParams]
    prefill_here: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., first_logprob: _Optional[float] = ..., sampling: _Optional[_Union[_baton_pb2.SamplingParams, _Mapping]] = ..., resumed: _Optional[_Union[Resumed, _Mapping]] = ..., forks: _Optional[_Iterable[_Union[_baton_pb2.SamplingParams, _Mapping]]] = ..., prefill_here: bool = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("freed_blocks",)
    FREED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    freed_blocks: int
    def __init__(self, freed_blocks: _Optional[int] = ...) -> None: ...

class NodeGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "resumed", "forks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FORKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _baton_pb2.SamplingParams
    resumed: Resumed
    forks: _containers.RepeatedCompositeFieldContainer[_baton_pb2.SamplingParams]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_baton_pb2.SamplingParams, _Mapping]] = ..., resumed: _Optional[_Union[Resumed, _Mapping]] = ..., forks: _Optional[_Iterable[_Union[_baton_pb2.SamplingParams, _Mapping]]] = ...) -> None: ...

class StreamsRequest(_message.Message):
    __slots__ = ("generate", "continues", "cancel", "acked")
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CONTINUES_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    generate: _containers.RepeatedCompositeFieldContainer[NodeGenerateRequest]
    continues: _containers.RepeatedCompositeFieldContainer[ContinueRequest]
    cancel: _containers.RepeatedScalarFieldContainer[str]
    acked: int
    def __init__(self, generate: _Optional[_Iterable[_Union[NodeGenerateRequest, _Mapping]]] = ..., continues: _Optional[_Iterable[_Union[ContinueRequest, _Mapping]]] = ..., cancel: _Optional[_Iterable[str]] = ..., acked: _Optional[int] = ...) -> None: ...

class StreamsBatch(_message.Message):
    __slots__ = ("responses", "ends")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    ENDS_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[_baton_pb2.GenerateResponse]
    ends: _containers.RepeatedCompositeFieldContainer[StreamEnd]
    def __init__(self, responses: _Optional[_Iterable[_Union[_baton_pb2.GenerateResponse, _Mapping]]] = ..., ends: _Optional[_Iterable[_Union[StreamEnd, _Mapping]]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("request_id", "code", "details", "lost_node")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    LOST_NODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    details: str
    lost_node: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., lost_node: _Optional[str] = ...) -> None: ...

class KVTarget(_message.Message):
    __slots__ = ("decode_node_id", "decode_address", "kv_store_address", "block_ids", "transfer_tag", "layout", "share", "rank_shares", "cached_blocks")
    DECODE_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TAG_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    RANK_SHARES_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    decode_node_id: str
    decode_address: str
    kv_store_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    transfer_tag: int
    layout: KVLayout
    share: KVShare
    rank_shares: _containers.RepeatedCompositeFieldContainer[KVShare]
    cached_blocks: int
    def __init__(self, decode_node_id: _Optional[str] = ..., decode_address: _Optional[str] = ..., kv_store_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., transfer_tag: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., share: _Optional[_Union[KVShare, _Mapping]] = ..., rank_shares: _Optional[_Iterable[_Union[KVShare, _Mapping]]] = ..., cached_blocks: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "target", "resumed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _baton_pb2.SamplingParams
    target: KVTarget
    resumed: Resumed
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_baton_pb2.SamplingParams, _Mapping]] = ..., target: _Optional[_Union[KVTarget, _Mapping]] = ..., resumed: _Optional[_Union[Resumed, _Mapping]] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("chunk", "finish")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    chunk: _baton_pb2.TokenChunk
    finish: _baton_pb2.FinishReason
    def __init__(self, chunk: _Optional[_Union[_baton_pb2.TokenChunk, _Mapping]] = ..., finish: _Optional[_Union[_baton_pb2.FinishReason, str]] = ...) -> None: ...

class TransferDone(_message.Message):
    __slots__ = ("bytes_sent",)
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    def __init__(self, bytes_sent: _Optional[int] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("first_token", "transfer_done")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DONE_FIELD_NUMBER: _ClassVar[int]
    first_token: FirstToken
    transfer_done: TransferDone
    def __init__(self, first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., transfer_done: _Optional[_Union[TransferDone, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node_id", "role", "total_blocks", "free_blocks", "running", "waiting", "reserved", "kv_bytes_received", "kv_bytes_sent", "requests_served", "peers", "rank_kv_bytes", "prefix_cache", "queued_tokens", "kv_bytes_pulled")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    RANK_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    reserved: int
    kv_bytes_received: int
    kv_bytes_sent: int
    requests_served: int
    peers: int
    rank_kv_bytes: _containers.RepeatedScalarFieldContainer[int]
    prefix_cache: PrefixCache
    queued_tokens: int
    kv_bytes_pulled: int
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., total_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., reserved: _Optional[int] = ..., kv_bytes_received: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., requests_served: _Optional[int] = ..., peers: _Optional[int] = ..., rank_kv_bytes: _Optional[_Iterable[int]] = ..., prefix_cache: _Optional[_Union[PrefixCache, _Mapping]] = ..., queued_tokens: _Optional[int] = ..., kv_bytes_pulled: _Optional[int] = ...) -> None: ...

class PrefixCache(_message.Message):
    __slots__ = ("cached_blocks", "queries", "hits", "evictions", "offloaded_blocks", "offload_hits")
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_HITS_FIELD_NUMBER: _ClassVar[int]
    cached_blocks: int
    queries: int
    hits: int
    evictions: int
    offloaded_blocks: int
    offload_hits: int
    def __init__(self, cached_blocks: _Optional[int] = ..., queries: _Optional[int] = ..., hits: _Optional[int] = ..., evictions: _Optional[int] = ..., offloaded_blocks: _Optional[int] = ..., offload_hits: _Optional[int] = ...) -> None: ...

class KVEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVBlock(_message.Message):
    __slots__ = ("name", "parent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    parent: bytes
    def __init__(self, name: _Optional[bytes] = ..., parent: _Optional[bytes] = ...) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("seq", "snapshot", "stored", "removed", "node_id", "model_seed", "block_size")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SEED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    snapshot: bool
    stored: _containers.RepeatedCompositeFieldContainer[KVBlock]
    removed: _containers.RepeatedScalarFieldContainer[bytes]
    node_id: str
    model_seed: bytes
    block_size: int
    def __init__(self, seq: _Optional[int] = ..., snapshot: bool = ..., stored: _Optional[_Iterable[_Union[KVBlock, _Mapping]]] = ..., removed: _Optional[_Iterable[bytes]] = ..., node_id: _Optional[str] = ..., model_seed: _Optional[bytes] = ..., block_size: _Optional[int] = ...) -> None: ...
