"""Routing by where a prefix lives (issue 25, part 3): nodes publish their prefix caches' changes (KV events),
routers index them and send each request where its prefix is cached. In one process, a real engine, publisher,
gRPC server and index: the index holds exactly the engine's names, and a router that fell behind and lost
events rebuilds its entry from a snapshot. On a real 2P2D cluster with two routers: conversations stay on the
nodes that hold them, through either router and across a router restart, so their K/V are computed and moved
once."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc

from cluster_harness import BatonUp
from test_prefix_transfer import block_bytes, held_blocks
from test_routers import Router
from test_stories import PROMPTS

from baton.common.kv_events import KVEventPublisher, KVEventsServicer
from baton.common.membership import NodeInfo, close_quietly, etcd_client, read_routers
from baton.engine import LLM, SamplingParams
from baton.engine.async_engine import AsyncEngine
from baton.router.client import BatonClient
from baton.router.kv_index import KVIndex, PromptBlocks
from baton.v1 import node_pb2_grpc

BOUND = 60.0


async def until(condition, what: str) -> None:
    """Yields to the event loop until `condition()` holds (a hang fails the test at BOUND)."""
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.001)


def test_the_index_holds_the_engines_names_and_rebuilds_after_lost_events(stories_path):
    """Events carry every name the engine stores and removes, so the index equals the engine's names; a
    subscriber that falls more than its buffer behind loses batches, sees the numbering jump, and subscribes
    again for a snapshot (the resync is counted); a flush empties the index; a snapshot from another node than
    the one followed is refused."""
    llm = LLM(str(stories_path), num_kv_blocks=16)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [llm.tokenizer.encode(p) * 3 for p in PROMPTS]

    async def main():
        engine = AsyncEngine(llm.engine, asyncio.get_running_loop())
        publisher = KVEventPublisher("colocated-0", engine, buffer=1)
        server = grpc.aio.server()
        node_pb2_grpc.add_KVEventsServicer_to_server(KVEventsServicer(publisher), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        resyncs: list[str] = []
        index = KVIndex(membership=None, on_resync=lambda node_id, cause: resyncs.append(cause))
        node = NodeInfo("colocated-0", "colocated", "stories", f"127.0.0.1:{port}")
        follow = index.follow(node)
        names = lambda: {name for name, _ in llm.engine.blocks.named()}  # noqa: E731 - read while idle
        indexed = lambda: (e := index.entry("colocated-0")) is not None and e.names == names()  # noqa: E731
        try:
            await until(lambda: index.entry("colocated-0") is not None, "the snapshot")
            outputs = []
            for i, prompt in enumerate(prompts[:3]):
                outputs.append([t async for out in engine.generate(f"r{i}", prompt, params) for t in out.token_ids])
                await until(indexed, "the index")
            follow_up = PromptBlocks(prompts[0] + outputs[0] + [5, 6, 7])  # the conversation's next turn
            assert index.held_tokens("colocated-0", follow_up) == (len(prompts[0]) + params.max_tokens - 1) // 16 * 16
            assert resyncs == []

            # The event loop stalls while the engine works through more requests (evicting as it goes): their
            # batches then reach the publisher one after the other, more than the subscriber's buffer holds.
            blocks = llm.engine.blocks
            more = prompts[3:] + prompts[:2]
            looked_up = blocks.counters.queries + sum(map(len, more))
            for i, prompt in enumerate(more):
                asyncio.ensure_future(engine.call(llm.engine.add_request, f"s{i}", prompt, params))
            await asyncio.sleep(0)  # the adds are submitted
            while blocks.counters.queries < looked_up or llm.engine.has_unfinished():
                time.sleep(0.001)  # the loop is blocked: only the engine thread runs
            assert blocks.counters.evictions > 0
            await until(lambda: publisher.dropped > 0, "batches dropped")
            # The next batch shows the gap: the index subscribes again and rebuilds from a snapshot.
            async for _ in engine.generate("after", prompts[2] + [9] * 30, params):
                pass
            await until(lambda: resyncs and indexed(), "a resync")
            assert resyncs == ["gap"] and names()

            await engine.call(llm.engine.reset_prefix_cache)
            await until(lambda: index.entry("colocated-0") is not None and not index.entry("colocated-0").names,
                        "the flush")

            # Events from a node that is not the member at that address never enter the index.
            impostor = index.follow(NodeInfo("colocated-9", "colocated", "stories", node.address))
            try:
                await until(lambda: "refused" in resyncs, "the refusal")
                assert index.entry("colocated-9") is None
            finally:
                impostor.cancel()
        finally:
            follow.cancel()
            publisher.close()
            await server.stop(None)
            await engine.close()

    asyncio.run(main())


def test_a_prefill_node_is_weighed_with_what_it_can_read_back_from_the_decode_node(stories_path):
    """The prefill cost counts the tokens a prefill node would read back from the decode node picked for the
    request (those the decode node holds beyond the prefill node's own cache, when they reach the node's
    `kv_pull_min_tokens`) at PULL_COST of a computed token. Two real engines publish what they hold to a real
    index: decode-0 decoded a conversation's first turn, prefill-0 computed its prompt, prefill-1 holds nothing.
    Equal queues: prefill-0 (its own cache costs nothing); with prefill-0's queue at half the prompt it holds,
    prefill-1, which would read the whole prefix back, where the cost without reading back kept prefill-0;
    and prefill-0 again when prefill-1 never reads back."""
    from baton.router.routing import PULL_COST, KVAware

    decode_llm, prefill_llm = (LLM(str(stories_path), num_kv_blocks=32) for _ in range(2))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    first = decode_llm.tokenizer.encode(PROMPTS[0]) * 8

    async def main():
        loop = asyncio.get_running_loop()
        engines = {"decode-0": AsyncEngine(decode_llm.engine, loop), "prefill-0": AsyncEngine(prefill_llm.engine, loop)}
        publishers, servers, follows, nodes = [], [], [], {}
        index = KVIndex(membership=None)
        try:
            for node_id, engine in engines.items():
                publishers.append(publisher := KVEventPublisher(node_id, engine))
                servers.append(server := grpc.aio.server())
                node_pb2_grpc.add_KVEventsServicer_to_server(KVEventsServicer(publisher), server)
                port = server.add_insecure_port("127.0.0.1:0")
                await server.start()
                role = node_id.split("-")[0]
                nodes[node_id] = NodeInfo(node_id, role, "stories", f"127.0.0.1:{port}",
                                          kv_pull_min_tokens=16 if role == "prefill" else 0)
                follows.append(index.follow(nodes[node_id]))
            nodes["prefill-1"] = NodeInfo("prefill-1", "prefill", "stories", "127.0.0.1:1", kv_pull_min_tokens=16)
            answer = [t async for out in engines["decode-0"].generate("turn", first, params) for t in out.token_ids]
            async for _ in engines["prefill-0"].generate("prompt", first, SamplingParams(max_tokens=1)):
                pass
            prompt = PromptBlocks(first + answer + [5, 6, 7])  # the next turn
            own, theirs = len(first) // 16 * 16, (len(first) + len(answer) - 1) // 16 * 16
            await until(lambda: index.held_tokens("prefill-0", prompt) == own
                        and index.held_tokens("decode-0", prompt) == theirs, "the index")
            routing, length = KVAware(index), len(prompt.token_ids)
            decode, p0, p1 = nodes["decode-0"], nodes["prefill-0"], nodes["prefill-1"]
            assert routing.prompt_work(p0, prompt, decode) == (length - theirs, theirs - own)
            assert routing.prompt_work(p1, prompt, decode) == (length - theirs, theirs)
            assert routing.prompt_work(p1, prompt, None) == (length, 0)  # colocated, or no decode node known

            load = lambda n: 0  # noqa: E731
            queue = {"prefill-0": 0, "prefill-1": 0}
            pick = lambda *ns: routing.choose("prefill", list(ns), load, lambda n: queue[n.node_id], prompt,  # noqa: E731
                                              decode).node_id
            assert pick(p0, p1) == "prefill-0"
            queue["prefill-0"] = own // 2  # more than PULL_COST of what it holds, less than all of it
            assert PULL_COST * own < own // 2 < own
            assert pick(p0, p1) == "prefill-1"
            never = NodeInfo("prefill-1", "prefill", "stories", "127.0.0.1:1", kv_pull_min_tokens=0)
            assert routing.prompt_work(never, prompt, decode) == (length, 0)
            assert pick(p0, never) == "prefill-0"
        finally:
            for follow in follows:
                follow.cancel()
            for publisher in publishers:
                publisher.close()
            for server in servers:
                await server.stop(None)
            for engine in engines.values():
                await engine.close()

    asyncio.run(main())


def _metrics(address: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return {(s.name, s.labels.get("node", s.labels.get("cause", ""))): s.value
                for f in text_string_to_metric_families(reply.read().decode()) for s in f.samples}


def test_conversations_stay_where_their_prefix_lives_through_either_router(stories_path, stories_llm, tmp_path):
    """2P2D, two routers routing by KV: four conversations of three turns each, every turn through the other
    router than the one before, one router restarted midway. Each turn goes to the prefill node that computed
    the conversation's earlier prompts and to the decode node that holds what it decoded: the prefill nodes'
    hits, the KV bytes moved and those the prefill nodes read back (the answers, which only the decode node
    computed) are those of one node per role having seen the whole conversation."""
    tokenizer = stories_llm.tokenizer
    greedy = dict(max_tokens=20, temperature=0, ignore_eos=True)
    conversations = [tokenizer.encode(p) * 3 for p in PROMPTS[:4]]
    # Every turn through a prefill node (a decode node holding most of one would compute it itself).
    options = ("--routing", "kv", "--max-local-prefill-tokens", "0")
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "2", "--decode", "2", *options) as up:
        prefills, decodes = up.nodes("prefill"), up.nodes("decode")
        second = Router(up, stories_path, *options)
        addresses = [up.address, second.__enter__()]
        try:
            def metrics_addresses() -> list[str]:
                async def read():
                    etcd = etcd_client(up.etcd, timeout=5.0)
                    try:
                        return await read_routers(etcd, up.cluster)
                    finally:
                        await close_quietly(etcd)

                return [r.metrics_address for r in asyncio.run(read())]

            def in_sync() -> bool:
                """Every router's index holds what every node holds (the nodes' own counts)."""
                held = {n.node_id: up.stats(n).prefix_cache.cached_blocks for n in prefills + decodes}
                for address in metrics_addresses():
                    seen = _metrics(address)
                    if any(seen.get(("baton_router_kv_index_blocks", n), -1) != blocks for n, blocks in held.items()):
                        return False
                return True

            def complete(address: str, history: list[int]) -> list[int]:
                with BatonClient(address, timeout=60) as client:
                    return client.complete(history, **greedy).token_ids

            hits = moved = pulled = 0
            per_block = block_bytes(stories_llm.engine)
            prefill_seen: list[list[list[int]]] = [[] for _ in conversations]  # per conversation, its prompts
            decode_seen: list[list[list[int]]] = [[] for _ in conversations]  # and what its decode side computed
            for turn in range(3):
                if turn == 2:  # the second router restarts: its index comes back from the nodes' snapshots
                    second.__exit__()
                    second = Router(up, stories_path, *options)
                    addresses[1] = second.__enter__()
                up.wait_until(in_sync, 30)
                if turn == 0:  # all at once: routing spreads them over the nodes by their load
                    with ThreadPoolExecutor(len(conversations)) as pool:
                        answers = list(pool.map(lambda h: complete(up.address, h), conversations))
                for c, history in enumerate(conversations):
                    if turn:
                        up.wait_until(in_sync, 30)
                        answers[c] = complete(addresses[(turn + c) % 2], history)
                    assert answers[c] == stories_llm.generate([history], SamplingParams(**greedy))[0].token_ids
                    # The prefill node reads back what the decode node holds and it lacks (the answers): its hits
                    # are the decode node's blocks, and the difference is pulled.
                    own, theirs = held_blocks(prefill_seen[c], history), held_blocks(decode_seen[c], history)
                    hits += max(own, theirs) * 16
                    pulled += max(0, theirs - own) * per_block
                    moved += (-(-len(history) // 16) - held_blocks(decode_seen[c], history)) * per_block
                    prefill_seen[c].append(history)
                    decode_seen[c].append(history + answers[c][:-1])
                    conversations[c] = history + answers[c] + tokenizer.encode(" Then")
            # Where each conversation began, it stayed: nothing computed or moved twice.
            assert all(up.stats(n).requests_served for n in prefills + decodes)  # both nodes of each role served
            assert sum(up.stats(n).prefix_cache.hits for n in prefills) == hits > 0
            assert sum(up.stats(n).kv_bytes_pulled for n in prefills) == pulled > 0
            assert sum(up.stats(n).kv_bytes_received for n in decodes) == moved
        finally:
            second.__exit__()
    assert not up.hung and up.leftovers == [] and up.returncode == 0
