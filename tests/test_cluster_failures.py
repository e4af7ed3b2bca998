"""What a failure leaves behind: nothing. Leases, failed transfers, full caches and dead nodes, on a real
cluster (`baton up`, one prefill and one small decode node)."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from cluster_harness import BatonUp

from baton.router.client import BatonClient, ResourceExhausted, Unavailable
from baton.v1 import node_pb2, node_pb2_grpc

BLOCKS = 12  # x 16 tokens: a decode node that a few requests fill


@pytest.fixture()
def up(stories_path, tmp_path):
    with BatonUp(tmp_path, "--model", str(stories_path), "--num-kv-blocks", str(BLOCKS),
                 "--transfer-timeout", "2") as cluster:
        yield cluster


def decode_stub(up) -> tuple[node_pb2_grpc.DecodeNodeStub, grpc.Channel]:
    channel = grpc.insecure_channel(up.nodes("decode")[0].address)
    return node_pb2_grpc.DecodeNodeStub(channel), channel


def all_free(up) -> bool:
    s = up.stats(up.nodes("decode")[0])
    return s.free_blocks == s.total_blocks == BLOCKS and s.reserved == 0 and not s.running


def test_an_unclaimed_reservation_is_freed_when_its_lease_ends(up):
    """The orphan's 300 ms lease may run out before anything is read back (an etcd lookup and a gRPC call on a
    loaded machine take longer), so nothing here depends on when it is read: a reservation leased for an hour
    stays beside it, and the node's own log says how the orphan went (its lease, while still RESERVED)."""
    decode = up.nodes("decode")[0]
    log = up.log_dir / f"{decode.node_id}.log"
    stub, channel = decode_stub(up)
    with channel:
        held = stub.Reserve(node_pb2.ReserveRequest(request_id="held", prompt_tokens=40, max_tokens=8,
                                                    lease_ms=3_600_000))
        r = stub.Reserve(node_pb2.ReserveRequest(request_id="orphan", prompt_tokens=40, max_tokens=8, lease_ms=300))
        r, held = r.target, held.target
        assert len(r.block_ids) == len(held.block_ids) == 3 and not set(r.block_ids) & set(held.block_ids)
        up.wait_until(lambda: "released orphan (lease expired): 3 blocks" in log.read_text(), timeout=20, interval=0.05)
        assert "reservation orphan expired in phase RESERVED" in log.read_text()
        s = up.stats(decode)  # only the orphan went: the other reservation holds its blocks
        assert (s.reserved, s.free_blocks, s.total_blocks) == (1, BLOCKS - 3, BLOCKS)
        assert stub.Release(node_pb2.ReleaseRequest(request_id="held"), timeout=10).freed_blocks == 3
    assert all_free(up)
    assert "released held" not in log.read_text()  # a plain Release is not logged as a loss


def test_a_transfer_that_never_comes_releases_the_reservation(up):
    stub, channel = decode_stub(up)
    with channel:
        r = stub.Reserve(node_pb2.ReserveRequest(request_id="lonely", prompt_tokens=40, max_tokens=8)).target
        with pytest.raises(grpc.RpcError) as e:  # no such prefill node: the channel set-up times out (2 s)
            stub.ReceiveKV(node_pb2.ReceiveKVRequest(request_id="lonely", prefill_node_id="ghost", generation=1,
                                                     layout=r.layout, num_tokens=40), timeout=20)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert all_free(up)


def test_a_full_decode_node_answers_resource_exhausted_then_serves_again(up):
    stub, channel = decode_stub(up)
    with channel, BatonClient(up.address, timeout=30) as client:
        stub.Reserve(node_pb2.ReserveRequest(request_id="hog", prompt_tokens=BLOCKS * 16 - 8, max_tokens=8))
        with pytest.raises(ResourceExhausted):
            client.complete("Once upon a time", max_tokens=5)
        stub.Release(node_pb2.ReleaseRequest(request_id="hog"))
        assert client.complete("Once upon a time", max_tokens=5, temperature=0).finished.completion_tokens == 5
    assert all_free(up)


def test_a_dead_prefill_node_fails_requests_cleanly(up):
    os.kill(up.node_pid("prefill-0"), signal.SIGKILL)
    with BatonClient(up.address, timeout=30) as client:
        # Still in the membership for up to its TTL: the router picks it, the call fails, nothing leaks.
        with pytest.raises(Unavailable):
            client.complete("Once upon a time", max_tokens=5)
        assert all_free(up)
        up.wait_until(lambda: not up.nodes("prefill"), timeout=5, interval=0.1)
        with pytest.raises(Unavailable) as e:
            client.complete("Once upon a time", max_tokens=5)
        assert "prefill" in e.value.details
    assert all_free(up)


def test_a_prefill_node_that_leaves_before_joining_frees_the_reservation_at_once(stories_path, tmp_path):
    """The caller of ReceiveKV (a prefill node) goes away before it joined the pair group, here by its call's
    deadline, as when it dies: the decode side gives the set-up up and frees the blocks at once, not at the end
    of the transfer timeout (60 s here) that it would otherwise wait for a peer that never comes."""
    with BatonUp(tmp_path, "--model", str(stories_path), "--num-kv-blocks", str(BLOCKS),
                 "--transfer-timeout", "60") as up:
        stub, channel = decode_stub(up)
        with channel:
            r = stub.Reserve(node_pb2.ReserveRequest(request_id="gone", prompt_tokens=40, max_tokens=8)).target
            with pytest.raises(grpc.RpcError) as e:
                stub.ReceiveKV(node_pb2.ReceiveKVRequest(request_id="gone", prefill_node_id="ghost", generation=1,
                                                         layout=r.layout, num_tokens=40), timeout=1.0)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stub.Release(node_pb2.ReleaseRequest(request_id="gone"), timeout=10)  # what the router sends
            up.wait_until(lambda: all_free(up), timeout=20)  # far below the 60 s it would hold them
            assert "abandoned before 'ghost' joined" in (up.log_dir / "decode-0.log").read_text()
