"""The `baton` command line.

Nothing heavy is imported at module level: importing torch starts a thread, and `baton up` must block its
stop signals before any thread exists (see `main`); `baton bench` alone needs the bench extra.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton.cluster.launch import ClusterSpec
    from baton.engine import SamplingParams


@contextlib.contextmanager
def _naming_fields() -> Iterator[None]:
    """A check's ValueError (`field: message`, the form every config check raises) as the CLI's FieldError:
    exit status 2, the field named."""
    from baton.engine import FieldError

    try:
        yield
    except FieldError:
        raise
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise FieldError(field, message) from None


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def _params(args: argparse.Namespace) -> SamplingParams:
    from baton.engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _generate(args: argparse.Namespace) -> int:
    if args.router:
        return _generate_remote(args)
    from baton.engine import LLM

    with LLM(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels, enforce_eager=args.enforce_eager,
             tensor_parallel_size=args.tp, enable_prefix_caching=args.enable_prefix_caching,
             kv_offload_bytes=args.kv_offload_bytes) as llm:
        for out in llm.stream(args.prompt, _params(args)):
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from baton.router.client import BatonClient, BatonError, Delta, InvalidArgument

    p = _params(args)  # validated here too: the same messages as offline
    options = dict(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                   seed=p.seed, stop=p.stop, ignore_eos=p.ignore_eos)
    try:
        with BatonClient(args.router, timeout=args.timeout) as client:
            for item in client.generate(args.prompt, **options):
                if isinstance(item, Delta):
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
    except InvalidArgument as e:
        print(f"baton: error: {e.details}", file=sys.stderr)
        return 2
    except BatonError as e:
        print(f"baton: error: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N|auto",
                        help="where the engine runs (auto: CUDA when present; default cpu while the CUDA path "
                             "is unproven)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                        help="the model's hot operations in torch or Triton (auto: Triton on CUDA, torch on a "
                             "CPU; triton on a CPU needs TRITON_INTERPRET=1)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs for decode steps (by default captured on CUDA with Triton kernels)")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel ranks, one process each (on CUDA, one GPU each from --device's)")


def _kv_path_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-path", choices=["auto", "pair", "shared"], default="auto",
                        help="how K/V go from prefill to decode nodes: the pair channel (gloo, NCCL), or straight "
                             "into the decode node's memory when both nodes are on one device (auto: on a shared "
                             "GPU; shared: on one CPU host too, through /dev/shm)")


def _kv_pull_arg(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument("--kv-pull-min-tokens", type=int, default=default, metavar="N",
                        help="a prefill node reads back a prompt's cached blocks that the decode node holds and it "
                             "lacks, instead of computing them, when at least N tokens would come back (0: never; "
                             "default 16)")


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="HF checkpoint folder (default: the bundled stories260K)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    _device_arg(parser)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--enable-chunked-prefill", action="store_true")
    _prefix_caching_arg(parser, default=True)


def _prefix_caching_arg(parser: argparse.ArgumentParser, default: bool | None) -> None:
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=default,
                        help="keep full KV blocks for their contents and reuse them for prompts that start the "
                             "same way (on by default)")
    parser.add_argument("--kv-offload-bytes", type=int, default=None if default is None else 0, metavar="N",
                        help="the prefix cache's second tier: blocks evicted from the KV pool keep their K/V in N "
                             "bytes of pinned host memory (GPU pool) or of a file on local disk (CPU pool), and a "
                             "prompt that names them copies them back (0: off, the default; one rank only)")


def _engine_config(args: argparse.Namespace):
    from baton.engine import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
        enforce_eager=args.enforce_eager, tensor_parallel_size=args.tp, num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill, enable_prefix_caching=args.enable_prefix_caching,
        kv_offload_bytes=args.kv_offload_bytes,
    )


def _migration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-migrations", type=int, default=3, metavar="N",
                        help="times a stream may resume on other nodes after a node failed under it (0: never)")
    parser.add_argument("--stream-inactivity-timeout", type=float, default=10.0, metavar="S",
                        help="seconds without a token from a decode node before its streams move elsewhere")
    parser.add_argument("--node-wait", type=float, default=5.0, metavar="S",
                        help="seconds a request waits for a live node of a role that has none before it fails "
                             "UNAVAILABLE (nodes re-registering after an etcd outage, a node restarting)")
    parser.add_argument("--max-local-prefill-tokens", type=int, default=0, metavar="N",
                        help="conditional disaggregation: a decode node that holds a prompt's prefix cached computes "
                             "the rest itself when it is at most N tokens, with no prefill node (default 0: never; "
                             "the crossover measured in bench/README.md is none on a CPU)")
    parser.add_argument("--routing", choices=["kv", "least-loaded", "round-robin"], default="kv",
                        help="how the router chooses nodes: kv (where the prompt's prefix is cached, against load; "
                             "from the nodes' KV events), least-loaded, or round-robin (default: kv)")


def _cluster_args(parser: argparse.ArgumentParser, port: int = 0) -> None:
    parser.add_argument("--etcd", required=True, help="etcd URL, e.g. http://127.0.0.1:2379")
    parser.add_argument("--cluster", default="default", help="cluster name (etcd key prefix)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=port, help="0 picks a free port")
    _process_args(parser)


def _process_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="exit when the process that started this one ends (what `baton up` passes)")
    _log_format_arg(parser)


def _served_name_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                        help="the model's name in requests and listings, then its aliases (default: the "
                             "checkpoint folder's name; stories260K for the bundled model)")


def _log_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="log lines as text, or as JSON objects (one per line, with the request id)")


def _start_process(args: argparse.Namespace) -> None:
    """First thing in a server process: take the stop signals (a parent may have blocked them, and the mask
    survives exec), tie its life to the parent's if asked, pin it to its cores if asked."""
    from baton.cluster.orphans import die_with_parent, unblock_stop_signals

    unblock_stop_signals()
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    if getattr(args, "cpus", None):
        os.sched_setaffinity(0, args.cpus)


def _cpu_list(text: str) -> set[int]:
    try:
        cpus = {int(c) for c in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated core numbers, got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated core numbers, got {text!r}")
    return cpus


def _node(args: argparse.Namespace) -> int:
    from baton.cluster.node import NodeConfig, run

    _check_auth(args)
    _check_mtls(args)
    _start_process(args)
    run(NodeConfig(role=args.role, etcd=args.etcd, cluster=args.cluster, node_id=args.node_id, host=args.host,
                   port=args.port, metrics_port=args.metrics_port, advertise_host=args.advertise_host, ttl=args.ttl,
                   threads=args.threads, transfer_timeout=args.transfer_timeout, kv_path=args.kv_path,
                   kv_pull_min_tokens=args.kv_pull_min_tokens, drain_timeout=args.drain_timeout,
                   served_model_names=tuple(args.served_model_name), cluster_secret_file=args.cluster_secret_file,
                   log_format=args.log_format, engine=_engine_config(args), mtls_cert=args.mtls_cert,
                   mtls_key=args.mtls_key, mtls_ca=args.mtls_ca, follow_placement=args.follow_placement))
    return 0


def _check_mtls(args: argparse.Namespace) -> None:
    from baton.common.tls import MemberTls
    from baton.engine import FieldError

    given = [bool(args.mtls_cert), bool(args.mtls_key), bool(args.mtls_ca)]
    if any(given):
        if not all(given):
            raise FieldError("mtls_cert", "give --mtls-cert, --mtls-key and --mtls-ca together, or none")
        with _naming_fields():
            MemberTls(args.mtls_cert, args.mtls_key, args.mtls_ca)


def _tls_args(parser: argparse.ArgumentParser, ca: bool = False) -> None:
    parser.add_argument("--tls-cert", default="", metavar="PEM",
                        help="with --tls-key: the router's public gRPC fronts and OpenAI HTTP front answer TLS "
                             "only (the certificate chain, the server's first)")
    parser.add_argument("--tls-key", default="", metavar="PEM", help="the certificate's private key")
    if ca:
        parser.add_argument("--tls-ca", default="", metavar="PEM",
                            help="the issuer `baton up` trusts to check its router is up (default: the certificate "
                                 "itself, as for a self-signed one)")


def _check_tls(args: argparse.Namespace) -> None:
    from baton.common.tls import TlsFiles
    from baton.engine import FieldError

    if bool(args.tls_cert) != bool(args.tls_key):
        raise FieldError("tls_cert", "give both --tls-cert and --tls-key, or neither")
    if args.tls_cert:
        with _naming_fields():
            TlsFiles(args.tls_cert, args.tls_key)


def _mtls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mtls-cert", default="", metavar="PEM",
                        help="mutual TLS between the cluster's members: this process's certificate (naming the "
                             "addresses nodes register), with --mtls-key and --mtls-ca; nodes then answer members "
                             "only, over TLS")
    parser.add_argument("--mtls-key", default="", metavar="PEM", help="the member certificate's private key")
    parser.add_argument("--mtls-ca", default="", metavar="PEM", help="the CA that signs the members' certificates")


def _check_auth(args: argparse.Namespace) -> None:
    from baton.engine import FieldError

    # `baton up` with its private etcd makes a secret that goes with it; keys kept in an etcd that outlives the
    # command need a secret that does too.
    private_etcd = args.command == "up" and not args.etcd
    if getattr(args, "auth", False) and not args.cluster_secret_file and not private_etcd:
        raise FieldError("cluster_secret_file", "--auth needs the cluster's secret (--cluster-secret-file PATH)")
    if args.cluster_secret_file:
        from baton.common.keys import read_secret

        try:
            read_secret(args.cluster_secret_file)
        except (OSError, ValueError) as e:
            raise FieldError("cluster_secret_file", str(e)) from None


def _router(args: argparse.Namespace) -> int:
    from baton.common.tls import TlsFiles
    from baton.router.main import RouterConfig, run

    _check_auth(args)
    _check_mtls(args)
    with _naming_fields():  # refused here, naming the option, before the process starts anything
        cfg = RouterConfig(
            etcd=args.etcd, model=args.model, cluster=args.cluster, host=args.host, port=args.port,
            max_prompt_bytes=args.max_prompt_bytes, max_migrations=args.max_migrations,
            inactivity_timeout=args.stream_inactivity_timeout, node_wait=args.node_wait, http_port=args.http_port,
            chat_template=args.chat_template, log_format=args.log_format,
            served_model_name=args.served_model_name[0] if args.served_model_name else "",
            metrics_port=args.metrics_port, router_id=args.router_id, advertise_host=args.advertise_host,
            routing=args.routing,
            max_local_prefill_tokens=args.max_local_prefill_tokens, auth=args.auth,
            cluster_secret_file=args.cluster_secret_file, limits_fail_open=args.limits_fail_open,
            flow=_flow_settings(args), flag_addresses=args.flag_addresses, stall_timeout=args.stall_timeout,
            tls_cert=args.tls_cert, tls_key=args.tls_key, mtls_cert=args.mtls_cert, mtls_key=args.mtls_key,
            mtls_ca=args.mtls_ca, moderation_url=args.moderation_url, moderation_fail_open=args.moderation_fail_open,
            moderation_timeout=args.moderation_timeout)
        if cfg.tls_cert:
            TlsFiles(cfg.tls_cert, cfg.tls_key)
    _start_process(args)
    run(cfg)
    return 0


def _flow_settings(args: argparse.Namespace):
    from baton.router.flow import FlowSettings

    with _naming_fields():
        return FlowSettings(args.queue_policy, args.slots_per_seq, args.max_queued, args.max_queued_tokens,
                            args.max_queue_wait)


def _flow_args(parser: argparse.ArgumentParser) -> None:
    from baton.router.flow import POLICIES, FlowSettings

    d = FlowSettings()
    parser.add_argument("--queue-policy", choices=POLICIES, default=d.policy,
                        help="the order waiting requests go to the nodes in: fair (a key's priority, then weighted "
                             "fair queuing across keys) or fifo (default: %(default)s)")
    parser.add_argument("--slots-per-seq", type=float, default=d.slots_per_seq, metavar="X",
                        help="requests with the nodes at once, per sequence their batches hold (default: "
                             "%(default)s); the rest wait in the router's queue")
    parser.add_argument("--max-queued", type=int, default=d.max_queued, metavar="N",
                        help="requests waiting per model before the router answers busy (default: %(default)s)")
    parser.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens, metavar="N",
                        help="their prompt + max_tokens, per model (default: %(default)s)")
    parser.add_argument("--max-queue-wait", type=float, default=d.max_queue_wait, metavar="SECONDS",
                        help="seconds a request waits for a place before the router answers busy (default: "
                             "%(default)s)")
    parser.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a client that reads nothing of its stream for this long has its request cancelled "
                             "(default: %(default)s)")


def _up(args: argparse.Namespace) -> int:
    from baton.cluster.launch import run_up
    from baton.engine import FieldError
    from baton.engine.config import resolve_device, resolve_kernels

    # A device this machine lacks, or kernels it cannot run, are refused here, not by every node it starts.
    resolve_kernels(args.kernels, resolve_device(args.device))

    if args.max_migrations < 0:
        raise FieldError("max_migrations", f"must be >= 0, got {args.max_migrations}")
    if not args.stream_inactivity_timeout > 0:
        raise FieldError("stream_inactivity_timeout", f"must be > 0 seconds, got {args.stream_inactivity_timeout}")
    if not args.node_wait >= 0:
        raise FieldError("node_wait", f"must be >= 0 seconds, got {args.node_wait}")
    if args.max_local_prefill_tokens < 0:
        raise FieldError("max_local_prefill_tokens", f"must be >= 0, got {args.max_local_prefill_tokens}")
    if args.kv_pull_min_tokens is not None and args.kv_pull_min_tokens < 0:
        raise FieldError("kv_pull_min_tokens", f"must be >= 0 (0: never pull), got {args.kv_pull_min_tokens}")
    if args.tp > 1 and (args.prefill or args.decode):
        raise FieldError("tp", "--tp is the colocated nodes' degree: use --prefill-tp and --decode-tp for prefill "
                               "and decode nodes")
    spec, made = up_spec(args)
    try:
        return run_up(spec)
    finally:
        if made:  # its keys were in the private etcd, gone too
            import shutil

            shutil.rmtree(os.path.dirname(made), ignore_errors=True)


def up_spec(args: argparse.Namespace) -> tuple[ClusterSpec, str]:
    """The cluster `baton up` starts for its arguments (`baton.cluster.launch.up_commands` gives each process's
    command line), and the secret file it made for `--auth` without one ("": none made)."""
    from baton.cluster.launch import ClusterSpec, ModelPool, load_pools

    passed_on = {"--device": args.device, "--kernels": args.kernels, "--block-size": args.block_size,
                 "--num-kv-blocks": args.num_kv_blocks, "--max-num-seqs": args.max_num_seqs,
                 "--transfer-timeout": args.transfer_timeout, "--max-num-batched-tokens": args.max_num_batched_tokens,
                 "--kv-path": args.kv_path, "--drain-timeout": args.drain_timeout, "--log-format": args.log_format,
                 "--kv-pull-min-tokens": args.kv_pull_min_tokens, "--kv-offload-bytes": args.kv_offload_bytes}
    node_args = [part for flag, value in passed_on.items() if value is not None for part in (flag, str(value))]
    node_args += ["--enforce-eager"] if args.enforce_eager else []
    node_args += ["--no-enable-prefix-caching"] if args.enable_prefix_caching is False else []
    _check_auth(args)
    _check_mtls(args)
    _check_tls(args)
    _flow_settings(args)  # refused here, not by the router it starts
    auth_args, made = [], ""
    if args.auth:  # the routers need the cluster's secret; one is made for a private etcd's cluster
        secret_file = args.cluster_secret_file or (made := _new_secret_file())
        auth_args = ["--auth", "--cluster-secret-file", secret_file]
        auth_args += ["--limits-fail-open"] if args.limits_fail_open else []
        auth_args += ["--flag-addresses", str(args.flag_addresses)]
        node_args += ["--cluster-secret-file", secret_file]  # and the nodes answer members only
        print(f"baton: API keys required; the cluster secret is in {secret_file} (create a key with `baton keys "
              f"create --name NAME --etcd URL --cluster-secret-file {secret_file}`)", flush=True)
    if args.tls_cert:  # the router's public fronts over TLS; this command trusts --tls-ca, or the certificate
        auth_args += ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]
    if args.mtls_cert:  # the router and every node are members, over mutual TLS
        mtls = ["--mtls-cert", args.mtls_cert, "--mtls-key", args.mtls_key, "--mtls-ca", args.mtls_ca]
        auth_args += mtls
        node_args += mtls
    first = ModelPool(args.model, tuple(args.served_model_name), args.prefill, args.decode, args.colocated,
                      args.prefill_tp, args.decode_tp, args.tp)
    more: list[ModelPool] = []
    if args.config:  # the models and their nodes come from the file; the first is the router's
        first, *more = load_pools(args.config)
    names = ["--served-model-name", *first.names] if first.names else []
    role_args = {"colocated": ["--tp", str(first.tp), *names], "decode": ["--tp", str(first.decode_tp), *names],
                 "prefill": ["--tp", str(first.prefill_tp), *names]}
    spec = ClusterSpec(model=first.model, prefill=first.prefill, decode=first.decode, colocated=first.colocated,
                       port=args.port, etcd=args.etcd, threads=args.threads, pin=args.pin,
                       chunked_prefill=args.enable_chunked_prefill, node_args=node_args, role_args=role_args,
                       router_args=["--max-migrations", str(args.max_migrations), "--stream-inactivity-timeout",
                                    str(args.stream_inactivity_timeout), "--node-wait", str(args.node_wait),
                                    "--routing", args.routing, "--max-local-prefill-tokens",
                                    str(args.max_local_prefill_tokens), "--log-format", args.log_format,
                                    "--queue-policy", args.queue_policy, "--slots-per-seq", str(args.slots_per_seq),
                                    "--max-queued", str(args.max_queued), "--max-queued-tokens",
                                    str(args.max_queued_tokens), "--max-queue-wait", str(args.max_queue_wait),
                                    "--stall-timeout", str(args.stall_timeout)]
                       + auth_args + (["--chat-template", args.chat_template] if args.chat_template else []) + names,
                       http_port=args.http_port, more_models=more, log_dir=args.log_dir,
                       tls_trust=(args.tls_ca or args.tls_cert) if args.tls_cert else "")
    return spec, made


def _new_secret_file() -> str:
    """A fresh cluster secret in a folder of its own (the private etcd it guards goes with `baton up`)."""
    import tempfile

    from baton.common.keys import write_secret

    path = os.path.join(tempfile.mkdtemp(prefix="baton-secret-"), "cluster-secret")
    write_secret(path)
    return path


def _auth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth", action="store_true",
                        help="require an API key on every public call (Authorization: Bearer KEY; `baton keys`)")
    parser.add_argument("--cluster-secret-file", default="", metavar="PATH",
                        help="the cluster's secret, under which etcd keeps the keys' HMACs (with --auth; `baton up "
                             "--auth` makes one when not given)")
    parser.add_argument("--flag-addresses", type=int, default=20, metavar="N",
                        help="flag a key used from more than N client addresses in 10 minutes (metrics, log)")
    parser.add_argument("--limits-fail-open", action="store_true",
                        help="when etcd cannot be reached to take a key's budget, admit the request and charge it "
                             "later (the key's limits may then be exceeded); default: refuse it UNAVAILABLE")


def _place(args: argparse.Namespace) -> int:
    import asyncio

    import aetcd

    from baton.cluster import placement, placement_store

    try:
        spec = placement.load(args.spec) if args.spec else None
        cluster = args.cluster or (spec.cluster if spec else "")
        if args.spec and args.cluster and args.cluster != spec.cluster:
            raise placement.PlacementError("--cluster", f"{args.cluster!r}, but the spec's cluster is {spec.cluster!r}")
        if not args.spec and (not cluster or not (args.history or args.remove)):
            raise placement.PlacementError("SPEC", "give a spec file, or --history/--remove with --cluster NAME")
        if spec is not None and not (args.remove or args.history):
            for warning in placement.check_model(spec):
                print(f"baton: warning: {warning}", file=sys.stderr)
    except placement.PlacementError as e:
        print(f"baton: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        nodes, machines = len(spec.nodes()), len(spec.machines)
        print(f"baton: {args.spec}: a valid placement of cluster {cluster} ({nodes} node{'s' * (nodes != 1)} on "
              f"{machines} machine{'s' * (machines != 1)})")
        return 0
    etcd = args.etcd or (spec.etcd[0] if spec and spec.etcd else "")
    if not etcd:
        print("baton: error: --etcd: required (the spec names no etcd)", file=sys.stderr)
        return 2
    try:
        if args.history:
            for record in asyncio.run(placement_store.history(etcd, cluster)):
                print("\n".join(record.lines()))
            return 0
        if args.remove:
            record = asyncio.run(placement_store.remove(etcd, cluster))
        else:
            record = asyncio.run(placement_store.place(etcd, spec))
    except (aetcd.ClientError, ValueError) as e:  # etcd unreachable or refusing, a bad --etcd URL
        print(f"baton: error: etcd {etcd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if record is None:
        print(f"baton: cluster {cluster} has no placement: nothing to remove")
    else:
        print(f"baton: {'placed' if record.action == 'place' else 'removed'} cluster {cluster} "
              f"(history #{record.seq}):\n" + "\n".join(f"  {c}" for c in record.changes))
    return 0


def _launch(args: argparse.Namespace) -> int:
    import aetcd

    from baton.cluster.machine import LaunchConfig, MachineFiles, run_launch
    from baton.cluster.orphans import die_with_parent

    if args.parent_pid:
        die_with_parent(args.parent_pid)  # SIGTERM: the launch stops what it started, as when an operator asks
    _check_auth(args)  # each file is checked here, naming its flag; the placement says which the cluster uses
    _check_tls(args)
    _check_mtls(args)
    files = MachineFiles(secret=args.cluster_secret_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         mtls_cert=args.mtls_cert, mtls_key=args.mtls_key, mtls_ca=args.mtls_ca)
    try:
        return run_launch(LaunchConfig(machine=args.machine, etcd=args.etcd, cluster=args.cluster,
                                       log_dir=args.log_dir, files=files))
    except aetcd.ClientError as e:
        print(f"baton: error: etcd {args.etcd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _profile(args: argparse.Namespace) -> int:
    with _naming_fields():
        from baton.engine.profile import Grid, parse_ints

        fractions = tuple(float(f) for f in args.cached_fractions.split(",") if f.strip())
        if not fractions or not all(0 <= f < 1 for f in fractions):
            raise ValueError(f"cached_fractions: must be comma-separated fractions in [0, 1), got "
                             f"{args.cached_fractions!r}")
        if args.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {args.repeats}")
        grid = Grid(parse_ints(args.prompt_lens, "prompt_lens"), fractions, parse_ints(args.batches, "batches"),
                    parse_ints(args.contexts, "contexts"), args.repeats)
    import torch

    from baton.engine.profiling import profile

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _engine_config(args)
    done = profile(config, grid, progress=lambda text: print(f"  {text}", flush=True))
    done.save(args.output)
    a, b, c = done.prefill_fit
    d, e, f = done.decode_fit
    print(f"baton: profile of {done.model} ({done.device}, {done.dtype}, tp {done.tp}) written to {args.output}\n"
          f"  prefill step = {a * 1e3:.3f} ms + {b * 1e6:.3f} us x new tokens + {c * 1e9:.3f} ns x new x "
          f"(cached + new)\n"
          f"  decode step  = {d * 1e3:.3f} ms + {e * 1e6:.3f} us x batch + {f * 1e9:.3f} ns x batch x context")
    return 0


def _slo(text: str, complete: bool):
    from baton.cluster.planner import Slo
    from baton.engine import FieldError

    try:
        return Slo.parse(text, complete)
    except ValueError as e:
        raise FieldError("slo", str(e).removeprefix("slo: ")) from None


def _profile_file(path: str):
    from baton.engine import FieldError
    from baton.engine.profile import Profile, ProfileError

    try:
        return Profile.load(path)
    except ProfileError as e:
        raise FieldError("profile", str(e)) from None


def _simulate(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from baton.cluster.simulator import SimConfig, read_trace, simulate, summarize, thin
    from baton.engine import FieldError

    profile = _profile_file(args.profile)
    counts = {"prefill": 0, "decode": 0, "colocated": 0}
    if args.placement:
        from baton.cluster.placement import PlacementError, load

        try:
            for _, node in load(args.placement).nodes().values():
                counts[node.role] += 1
        except (OSError, PlacementError) as e:
            raise FieldError("placement", str(e)) from None
    else:
        for part in args.nodes.split(","):
            role, _, n = part.partition("=")
            if role.strip() not in counts or not n.strip().isdigit():
                raise FieldError("nodes", f"must be ROLE=N,... with roles prefill, decode, colocated; got {part!r}")
            counts[role.strip()] = int(n)
    slo = _slo(args.slo, complete=False)
    if args.bandwidth <= 0:
        raise FieldError("bandwidth", f"must be > 0 bytes per second, got {args.bandwidth}")
    k = args.thin
    if k < 1:
        raise FieldError("thin", f"must be >= 1, got {k}")
    with _naming_fields():
        try:
            requests = thin(read_trace(args.workload), k)
        except OSError as e:
            raise FieldError("workload", str(e)) from None
        simulated = {role: max(1, round(n / k)) if n else 0 for role, n in counts.items()}
        config = SimConfig(prefill=simulated["prefill"], decode=simulated["decode"],
                           colocated=simulated["colocated"], bandwidth=args.bandwidth)
        summary = summarize(simulate(profile, config, requests), slo.ttft, slo.tpot)
        if k > 1:  # what the whole cluster serves: k times what its sample did
            summary = dataclasses.replace(summary, requests=summary.requests * k, served=summary.served * k,
                                          goodput=summary.goodput * k,
                                          output_tokens_per_s=summary.output_tokens_per_s * k)
    shape = ", ".join(f"{n} {role}" for role, n in counts.items() if n)
    if k > 1:
        shape += f" (as {', '.join(f'{n} {role}' for role, n in simulated.items() if n)} on 1/{k} of the requests)"
    print(f"baton: simulated {summary.requests} requests on {shape} ({profile.model}, {profile.device}, "
          f"tp {profile.tp})\n"
          f"  TTFT p50 {summary.ttft_p50 * 1e3:.1f} ms, p99 {summary.ttft_p99 * 1e3:.1f} ms; "
          f"TPOT p50 {summary.tpot_p50 * 1e3:.2f} ms, p99 {summary.tpot_p99 * 1e3:.2f} ms\n"
          f"  served {summary.served}/{summary.requests} in {summary.duration:.1f} s; goodput "
          f"{summary.goodput:.2f} req/s ({summary.attained:.1%} within the SLO); "
          f"{summary.output_tokens_per_s:.0f} output tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(summary) | {"nodes": counts}, f, indent=1)
    return 0


def _planner(args: argparse.Namespace) -> int:
    from baton.cluster.planner import Planner
    from baton.engine import FieldError

    slo = _slo(args.slo, complete=True)
    for name in ("interval", "correction_weight"):
        if not getattr(args, name) >= (0 if name == "correction_weight" else 0.1):
            raise FieldError(name, f"out of range: {getattr(args, name)}")
    if args.confirm < 1 or args.cooldown < 0:
        raise FieldError("confirm" if args.confirm < 1 else "cooldown", "must be >= 1 (confirm), >= 0 (cooldown)")
    if args.max_nodes < 0 or args.max_nodes == 1:
        raise FieldError("max_nodes", f"must be 0 (change roles only) or >= 2 (a prefill and a decode node); got "
                                      f"{args.max_nodes}")
    if not 0 <= args.headroom <= 10:
        raise FieldError("headroom", f"must be from 0 to 10; got {args.headroom}")
    planner = Planner(_profile_file(args.profile), slo, confirm=args.confirm, cooldown=args.cooldown,
                      smoothing=args.correction_weight, max_nodes=args.max_nodes, headroom=args.headroom)
    from baton.cluster.planner_run import run_planner

    return run_planner(args.etcd, args.cluster, planner, args.interval, args.dry_run, args.metrics_port)


def _status(args: argparse.Namespace) -> int:
    from baton.cluster.status import run_status

    return run_status(args.etcd, args.cluster, args.watch)


def _http_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--http-port", type=int, default=port,
                        help=f"the router's OpenAI-compatible HTTP port, on its host (0: no HTTP front; default "
                             f"{port})")
    parser.add_argument("--chat-template", default="", metavar="FILE",
                        help="a Jinja chat template for /v1/chat/completions, in place of the checkpoint's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream the continuation of PROMPT to stdout")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--router", default="", metavar="HOST:PORT", help="generate through a running cluster")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds (with --router)")
    gen.add_argument("--model", default="", help="HF checkpoint folder (default: the bundled stories260K)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    _device_arg(gen)
    _prefix_caching_arg(gen, default=True)
    _sampling_args(gen)
    gen.set_defaults(run=_generate)

    up = sub.add_parser("up", help="start a local cluster: etcd, nodes and router; Ctrl-C stops it all")
    up.add_argument("--model", default="", help="HF checkpoint folder (default: the bundled stories260K)")
    up.add_argument("--prefill", type=int, default=1)
    up.add_argument("--decode", type=int, default=1)
    up.add_argument("--colocated", type=int, default=0)
    up.add_argument("--port", type=int, default=0, help="router port (0: a free one)")
    up.add_argument("--etcd", default="", help="an existing etcd URL (default: start a private one)")
    up.add_argument("--threads", type=int, default=0, help="torch threads per node (0: cores / nodes)")
    up.add_argument("--pin", action="store_true", help="pin node i to core i (isolated, equal resources)")
    up.add_argument("--enable-chunked-prefill", action="store_true", help="in decode and colocated nodes")
    _prefix_caching_arg(up, default=None)
    up.add_argument("--max-num-batched-tokens", type=int, default=None)
    _device_arg(up)
    up.add_argument("--num-kv-blocks", type=int, default=None)
    up.add_argument("--block-size", type=int, default=None, help="tokens per KV block (16)")
    up.add_argument("--max-num-seqs", type=int, default=None)
    up.add_argument("--transfer-timeout", type=float, default=None, help="seconds a KV transfer may take (30)")
    up.add_argument("--drain-timeout", type=float, default=None,
                    help="on SIGTERM, seconds a node finishes its work before handing its streams over (30)")
    _kv_path_arg(up)
    _kv_pull_arg(up, None)
    up.add_argument("--prefill-tp", type=int, default=1, metavar="P", help="the prefill nodes' tensor-parallel degree")
    up.add_argument("--decode-tp", type=int, default=1, metavar="D",
                    help="the decode nodes' tensor-parallel degree (any two degrees the model takes meet: each "
                         "decode rank receives its KV heads from the prefill ranks that hold them)")
    _migration_args(up)
    _http_args(up, 8000)
    up.add_argument("--config", default="", metavar="FILE",
                    help="several models, each with its own nodes (YAML, see examples/up/models.yaml); in place of "
                         "--model, --prefill, --decode, --colocated and the TP options")
    _served_name_arg(up)
    _log_format_arg(up)
    up.add_argument("--log-dir", default="", help="node and router logs (default: a fresh temporary folder)")
    _auth_args(up)
    _flow_args(up)
    _mtls_args(up)
    _tls_args(up, ca=True)
    up.set_defaults(run=_up)

    node = sub.add_parser("node", help="run one node (what `baton up` starts)")
    node.add_argument("--role", choices=["prefill", "decode", "colocated"], required=True)
    node.add_argument("--node-id", default="")
    node.add_argument("--follow-placement", action="store_true",
                      help="change role in place when the cluster's placement gives this node (--node-id, its name "
                           "there) another (how `baton launch` starts nodes)")
    node.add_argument("--ttl", type=float, default=3.0, help="membership lease in seconds")
    node.add_argument("--threads", type=int, default=0)
    node.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds a KV transfer may take")
    node.add_argument("--drain-timeout", type=float, default=30.0,
                      help="on SIGTERM, seconds to finish running work after leaving etcd; a decode node then "
                           "hands the streams it still has to the router, which resumes them elsewhere (default 30)")
    _kv_path_arg(node)
    _kv_pull_arg(node, 16)
    node.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                      help="serve Prometheus metrics (GET /metrics) on this port of --host (default 0: a free one); "
                           "the address is published in etcd, where `baton status` finds it")
    node.add_argument("--advertise-host", default="",
                      help="the address other nodes and the router dial (default: --host, or this machine's "
                           "address when --host is a wildcard such as 0.0.0.0)")
    node.add_argument("--cpus", type=_cpu_list, default=None, metavar="N[,N...]", help="pin to these cores")
    node.add_argument("--cluster-secret-file", default="", metavar="PATH",
                      help="the cluster's secret: the node's services then answer only callers that hold it (the "
                           "routers and other nodes given the same file); default: open to any caller")
    _mtls_args(node)
    _cluster_args(node)
    _served_name_arg(node)
    _engine_args(node)
    node.set_defaults(run=_node)

    router = sub.add_parser("router", help="run the router (what `baton up` starts)")
    router.add_argument("--model", default="", help="HF checkpoint folder (tokenizer and config)")
    router.add_argument("--max-prompt-bytes", type=int, default=0,
                        help="refuse prompt text over this many UTF-8 bytes before tokenizing it "
                             "(default: derived from the tokenizer and the model's context)")
    _migration_args(router)
    _http_args(router, 0)
    router.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                        help="without --http-port: serve Prometheus metrics (GET /metrics, /sd) on this port "
                             "(default 0: a free one); with it, they are on the HTTP port. The address is "
                             "published in etcd under the router's record")
    router.add_argument("--router-id", default="", help="its record's name in etcd (default: router-HOST:PORT, "
                                                         "its published address)")
    router.add_argument("--advertise-host", default="",
                        help="the address clients and scrapers dial, published in etcd (default: --host, or this "
                             "machine's address when --host is a wildcard such as 0.0.0.0)")
    _served_name_arg(router)
    _auth_args(router)
    _flow_args(router)
    _mtls_args(router)
    _tls_args(router)
    router.add_argument("--moderation-url", default="", metavar="URL",
                        help="screen every prompt with this moderation service (OpenAI's moderation API shape: "
                             "POST {\"input\": text}); flagged prompts are refused")
    router.add_argument("--moderation-fail-open", action="store_true",
                        help="when the moderation service cannot answer, admit the prompt unscreened (default: "
                             "refuse it UNAVAILABLE)")
    router.add_argument("--moderation-timeout", type=float, default=2.0, metavar="SECONDS")
    _cluster_args(router, port=50051)
    router.set_defaults(run=_router)

    place = sub.add_parser("place", help="validate a cluster placement and store it in etcd (baton launch follows it)")
    place.add_argument("spec", nargs="?", default="", metavar="SPEC", help="a YAML placement (see examples/)")
    place.add_argument("--etcd", default="", help="etcd URL (default: the spec's first etcd endpoint)")
    place.add_argument("--cluster", default="", help="with --history or --remove: the cluster (default: the spec's)")
    what = place.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="validate SPEC only; nothing is written")
    what.add_argument("--history", action="store_true", help="print the cluster's placement history")
    what.add_argument("--remove", action="store_true",
                      help="delete the cluster's placement: every `baton launch` of it stops its processes")
    place.set_defaults(run=_place)

    launch = sub.add_parser("launch", help="run this machine's nodes and router from the placement in etcd")
    launch.add_argument("--machine", required=True, help="this machine's name in the placement")
    launch.add_argument("--etcd", required=True, help="etcd URL, e.g. http://10.0.0.1:2379")
    launch.add_argument("--cluster", required=True, help="the cluster's name (its placement's `cluster`)")
    launch.add_argument("--log-dir", default="", help="node and router logs (default: a fresh temporary folder)")
    launch.add_argument("--parent-pid", type=int, default=0,
                        help="stop everything (as on SIGTERM) when the process that started this one ends")
    launch.add_argument("--cluster-secret-file", default="", metavar="PATH",
                        help="the cluster's secret on this machine: its nodes answer members only, and its router "
                             "checks API keys when the placement's options say auth: true")
    _tls_args(launch)  # used when the placement's options say tls: true (mtls: true for the --mtls-* files)
    _mtls_args(launch)
    launch.set_defaults(run=_launch)

    profile = sub.add_parser("profile", help="measure one node's step costs (prefill, decode) into a profile file "
                                             "for the planner and the simulator")
    _engine_args(profile)
    profile.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    profile.add_argument("--output", default="profile.yaml", metavar="FILE", help="default: profile.yaml")
    profile.add_argument("--prompt-lens", default="16,64,256,1024", metavar="N,N,...",
                         help="prompt lengths measured (those the model's context allows)")
    profile.add_argument("--cached-fractions", default="0,0.5", metavar="F,F,...",
                         help="of each prompt, the part found in the prefix cache (whole blocks)")
    profile.add_argument("--batches", default="1,4,16,64", metavar="N,N,...", help="decode batch sizes measured")
    profile.add_argument("--contexts", default="128,1024", metavar="N,N,...", help="decode context lengths measured")
    profile.add_argument("--repeats", type=int, default=5, help="prompts per prefill point (decode: 4x as many steps)")
    profile.set_defaults(run=_profile)

    simulate = sub.add_parser("simulate", help="predict a placement's TTFT, TPOT and goodput for a workload trace "
                                               "from a node profile (no model runs)")
    simulate.add_argument("--profile", required=True, metavar="FILE", help="a node profile (baton profile)")
    simulate.add_argument("--workload", required=True, metavar="FILE",
                          help='a trace: JSON lines of {"t": s, "prompt": tokens, "output": tokens}')
    nodes = simulate.add_mutually_exclusive_group(required=True)
    nodes.add_argument("--placement", metavar="FILE", help="a placement spec: its nodes' roles are counted")
    nodes.add_argument("--nodes", metavar="ROLE=N,...", help="e.g. prefill=2,decode=1 or colocated=2")
    simulate.add_argument("--bandwidth", type=float, default=1e9, metavar="BYTES/S",
                          help="one KV transfer's bandwidth (default 1e9)")
    simulate.add_argument("--slo", default="", metavar="ttft=MS,tpot=MS", help="what goodput counts")
    simulate.add_argument("--thin", type=int, default=1, metavar="K",
                          help="a large cluster: simulate 1/K of each role's nodes on a random 1/K of the requests "
                               "(rates are scaled back by K)")
    simulate.add_argument("--json", default="", metavar="FILE", help="also write the summary here")
    simulate.set_defaults(run=_simulate)

    planner = sub.add_parser("planner", help="hold TTFT and TPOT SLOs by changing the placement's prefill/decode "
                                             "split as the load shifts (nodes change role in place)")
    planner.add_argument("--etcd", required=True, help="etcd URL")
    planner.add_argument("--cluster", required=True, help="the cluster's name (its placement's)")
    planner.add_argument("--slo", required=True, metavar="ttft=MS,tpot=MS", help="the SLOs to hold (itl= for tpot=)")
    planner.add_argument("--profile", required=True, metavar="FILE", help="the nodes' profile (baton profile)")
    planner.add_argument("--interval", type=float, default=30.0, metavar="S", help="seconds between decisions")
    planner.add_argument("--confirm", type=int, default=2, metavar="N",
                         help="intervals a new split must be proposed in a row before it is applied")
    planner.add_argument("--cooldown", type=int, default=3, metavar="N", help="intervals between two changes")
    planner.add_argument("--correction-weight", type=float, default=0.5, metavar="W",
                         help="weight of each interval's observed/predicted ratio in the profile's correction (0: "
                              "trust the profile)")
    planner.add_argument("--max-nodes", type=int, default=0, metavar="N",
                         help="also add nodes where machines have room (free GPUs, a machine's max_nodes) and "
                              "remove them, up to N in all (0: only change the roles of the nodes placed)")
    planner.add_argument("--headroom", type=float, default=0.2, metavar="F",
                         help="with --max-nodes: each role gets its predicted need plus this fraction")
    planner.add_argument("--dry-run", action="store_true", help="print the decisions; change nothing")
    planner.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                         help="serve the planner's Prometheus metrics on this port (0: none)")
    planner.set_defaults(run=_planner)

    status = sub.add_parser("status", help="the cluster's nodes and their load, from etcd and their metrics")
    status.add_argument("--etcd", required=True,
                        help="etcd URL, e.g. http://127.0.0.1:2379 (`baton up` prints its own)")
    status.add_argument("--cluster", default="", help="the cluster's name (default: every cluster in that etcd)")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(run=_status)
    from baton.cluster import keys_cli, rules_cli

    keys_cli.add_parser(sub)
    rules_cli.add_parser(sub)
    for command in entry_points(group="baton.commands"):  # `baton bench`, from bench/ (see bench/command.py)
        command.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "launch"):
        # Before any thread exists (every thread inherits the mask): a SIGTERM delivered to a thread that
        # does not block it would kill `baton up` before it stops what it started. See launch.run_up.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    from baton.engine import FieldError

    try:
        return args.run(args)
    except FieldError as e:
        print(f"baton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
