"""The router's health is its readiness: SERVING only while a live node of every needed role is registered.

A real etcd, a real router process, and node records registered and revoked through `NodeRegistration` (the
router only reads them): a client that waits for SERVING and then sends must find the nodes there.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.cluster.etcd_server import EtcdServer, free_port
from baton.common.membership import NodeInfo, NodeRegistration

BATON = str(Path(sys.executable).with_name("baton"))
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WAIT = 20.0  # bound on a status change that follows a membership change within milliseconds


@pytest.fixture()
def router(tmp_path):
    cluster = f"r{uuid.uuid4().hex[:8]}"
    with EtcdServer() as etcd:
        port = free_port()
        log = open(tmp_path / "router.log", "wb")
        proc = subprocess.Popen([BATON, "router", "--etcd", etcd.url, "--cluster", cluster, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield etcd.url, cluster, f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


async def next_status(stub: health_pb2_grpc.HealthStub, want: int) -> None:
    """Follows the health Watch stream until it reports `want` (an event, not a poll)."""
    async for reply in stub.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT, wait_for_ready=True):
        if reply.status == want:
            return
    raise AssertionError("the Watch stream ended")


def info(node_id: str, role: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, role=role, model="LlamaForCausalLM", address="127.0.0.1:1", capacity=8,
                    free_blocks=8)


def test_health_follows_the_membership(router):
    etcd, cluster, address = router

    async def body() -> None:
        async def register(node_id: str, role: str) -> NodeRegistration:
            return await NodeRegistration.register(etcd, cluster, info(node_id, role), ttl=3)

        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await next_status(stub, NOT_SERVING)  # listening, no node yet
            prefill = await register("prefill-0", "prefill")
            decode = await register("decode-0", "decode")
            await next_status(stub, SERVING)
            await decode.close()  # a prefill node alone cannot serve
            await next_status(stub, NOT_SERVING)
            colocated = await register("colocated-0", "colocated")
            await next_status(stub, SERVING)
            await colocated.close()
            await prefill.close()
            await next_status(stub, NOT_SERVING)

    asyncio.run(body())
