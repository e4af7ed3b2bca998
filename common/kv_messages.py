"""Conversions between the wire messages that describe KV (layouts, same-device pool shares) and the engine's
and kvtransfer's types: what prefill and decode nodes agree on before a transfer."""

from __future__ import annotations

import torch

from baton.engine.engine import KVSpec
from baton.engine.errors import FieldError
from baton.kvtransfer.shared import SharedPool
from baton.v1 import node_pb2


def kv_layout(spec: KVSpec) -> node_pb2.KVLayout:
    """What a KV transfer between two engines must agree on."""
    return node_pb2.KVLayout(
        num_layers=spec.num_layers, block_size=spec.block_size, num_kv_heads=spec.model_kv_heads,
        head_dim=spec.head_dim, dtype=str(spec.dtype).removeprefix("torch."),
        tensor_parallel_size=spec.tensor_parallel_size,
    )


def layouts_match(theirs: node_pb2.KVLayout, ours: node_pb2.KVLayout, any_degree: bool) -> bool:
    """Whether a KV transfer between the two layouts can land; `any_degree`: the same-device path, which
    writes each decode rank its own heads whatever the two nodes' tensor-parallel degrees."""
    other = node_pb2.KVLayout()
    other.CopyFrom(theirs)
    if any_degree:
        other.tensor_parallel_size = ours.tensor_parallel_size
    return other == ours


def share_to_proto(pool: SharedPool) -> node_pb2.KVShare:
    return node_pb2.KVShare(
        device_id=pool.device_id, shape=list(pool.shape), dtype=str(pool.dtype).removeprefix("torch."),
        shm_path=pool.shm_path, cuda_handle=pool.cuda_handle, storage_size=pool.storage_size,
        storage_offset=pool.storage_offset, ref_counter_handle=pool.ref_counter_handle,
        ref_counter_offset=pool.ref_counter_offset, event_handle=pool.event_handle,
        event_sync_required=pool.event_sync_required, tensor_offset=pool.tensor_offset,
    )


def share_from_proto(msg: node_pb2.KVShare) -> SharedPool:
    """Raises FieldError naming `target.share` for a description no pool could have."""
    dtype = getattr(torch, msg.dtype, None)
    if not isinstance(dtype, torch.dtype) or len(msg.shape) != 6:
        raise FieldError("target.share", f"not a KV storage: dtype {msg.dtype!r}, shape {list(msg.shape)}")
    return SharedPool(
        device_id=msg.device_id, shape=tuple(msg.shape), dtype=dtype, shm_path=msg.shm_path,
        cuda_handle=msg.cuda_handle, storage_size=msg.storage_size, storage_offset=msg.storage_offset,
        ref_counter_handle=msg.ref_counter_handle, ref_counter_offset=msg.ref_counter_offset,
        event_handle=msg.event_handle, event_sync_required=msg.event_sync_required,
        tensor_offset=msg.tensor_offset,
    )
