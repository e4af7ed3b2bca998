"""`baton keys`: create, list, update, revoke and rotate the API keys routers with `--auth` accept (common/keys.py).

A key is shown once, when it is made: alone on the last line of stdout, for scripts (`key=$(baton keys create
... | tail -1)`). etcd keeps only its HMAC under the cluster's secret, so `create` and `rotate` need the secret
file the routers were given; `list` and `revoke` do not. Records are written with a compare on their revision,
so two edits of one key at once cannot lose either.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

from baton.common.keys import KeyRecord, digest, keys_prefix, new_key, read_secret
from baton.common.membership import close_quietly, etcd_client

from baton.cluster.status import table

RPC_TIMEOUT_S = 5.0
DEFAULT_GRACE_S = 3600.0


def _when(text: str) -> float:
    """An ISO 8601 date or date and time (UTC when it names no zone) as a Unix time."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO 8601 date or time (2027-01-31, 2027-01-31T12:00), "
                                         f"got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",")]
    if not all(models):
        raise argparse.ArgumentTypeError(f"must be model names separated by commas, got {text!r}")
    return models


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"


async def _records(client, cluster: str) -> list[tuple[KeyRecord, int]]:
    """Every key record that parses, with its modification revision, by name then creation."""
    found = []
    for kv in await client.get_prefix(keys_prefix(cluster).encode()):
        try:
            found.append((KeyRecord.from_json(kv.value), kv.mod_revision))
        except ValueError as e:
            print(f"baton: warning: skipping the key record at {kv.key.decode(errors='replace')}: {e}",
                  file=sys.stderr)
    return sorted(found, key=lambda r: (r[0].name, r[0].created, r[0].key_id))


async def _put(client, cluster: str, record: KeyRecord, revision: int) -> bool:
    """Writes `record` if its key is still at `revision` (0: absent); says whether it did."""
    key = f"{keys_prefix(cluster)}{record.key_id}".encode()
    tx = client.transactions
    unchanged = tx.mod(key) == revision if revision else tx.version(key) == 0
    ok, _ = await client.transaction(compare=[unchanged], success=[tx.put(key, record.to_json())], failure=[])
    return ok


async def _create(args: argparse.Namespace) -> int:
    secret = read_secret(args.cluster_secret_file)
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        now = time.time()
        if any(r.name == args.name and r.state(now) == "active" for r, _ in await _records(client, args.cluster)):
            print(f"baton: a key named {args.name!r} is active already: rotate it (`baton keys rotate --name "
                  f"{args.name}`) or revoke it first", file=sys.stderr)
            return 2
        key, key_id = new_key()
        record = KeyRecord(key_id=key_id, name=args.name, digest=digest(secret, key), models=args.models or [],
                           rpm=args.rpm, tpm=args.tpm, max_concurrency=args.max_concurrency,
                           max_tokens_per_request=args.max_tokens_per_request, quota_tokens=args.quota_tokens,
                           priority=args.priority, weight=args.weight, expires=args.expires or 0.0, created=now)
        if not await _put(client, args.cluster, record, 0):
            print("baton: a key with the same id appeared meanwhile; run it again", file=sys.stderr)
            return 1
    finally:
        await close_quietly(client)
    print(f"baton: key {key_id} ({args.name}) created in cluster {args.cluster}; it is shown once, below")
    print(key)
    return 0


async def _list(args: argparse.Namespace) -> int:
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        records = await _records(client, args.cluster)
    finally:
        await close_quietly(client)
    now = time.time()
    rows = [("ID", "NAME", "STATE", "MODELS", "LIMITS", "CREATED", "EXPIRES")]
    for r, _ in records:
        limits = [f"{name}={getattr(r, name)}" for name in ("rpm", "tpm", "max_concurrency", "max_tokens_per_request",
                                                            "quota_tokens") if getattr(r, name)]
        limits += [f"priority={r.priority}"] if r.priority else []
        limits += [f"weight={r.weight}"] if r.weight != 1 else []
        rows.append((r.key_id, r.name, r.state(now), ",".join(r.models) or "*", " ".join(limits) or "-",
                     _stamp(r.created), _stamp(r.expires)))
    print("\n".join(table(rows[0], rows[1:], left=len(rows[0]))))
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        now = time.time()
        chosen = [(r, rev) for r, rev in await _records(client, args.cluster)
                  if (r.key_id == args.id if args.id else r.name == args.name) and not r.revoked]
        if not chosen:
            print(f"baton: no unrevoked key {'with id ' + args.id if args.id else 'named ' + repr(args.name)}",
                  file=sys.stderr)
            return 2
        for record, revision in chosen:
            if not await _put(client, args.cluster, replace(record, revoked=now), revision):
                print(f"baton: key {record.key_id} changed meanwhile; run it again", file=sys.stderr)
                return 1
            print(f"baton: key {record.key_id} ({record.name}) revoked")
    finally:
        await close_quietly(client)
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    secret = read_secret(args.cluster_secret_file)
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        now = time.time()
        old = [(r, rev) for r, rev in await _records(client, args.cluster)
               if r.name == args.name and r.state(now) == "active"]
        if not old:
            print(f"baton: no active key named {args.name!r} to rotate", file=sys.stderr)
            return 2
        template = max(old, key=lambda r: r[0].created)[0]
        key, key_id = new_key()
        # The new key counts to the same account: its quota and windows go on from the old key's.
        record = replace(template, key_id=key_id, digest=digest(secret, key), created=now, account=template.ledger_id)
        if not await _put(client, args.cluster, record, 0):
            print("baton: a key with the same id appeared meanwhile; run it again", file=sys.stderr)
            return 1
        until = now + args.grace
        for r, revision in old:  # each old key stays valid for the grace period, not longer than it was to be
            ends = min(until, r.expires) if r.expires else until
            if not await _put(client, args.cluster, replace(r, expires=ends), revision):
                print(f"baton: key {r.key_id} changed meanwhile; its expiry was not set", file=sys.stderr)
                return 1
    finally:
        await close_quietly(client)
    print(f"baton: key {key_id} ({args.name}) created; the {len(old)} before it expire at {_stamp(until)}; "
          "the new key is shown once, below")
    print(key)
    return 0


_LIMITS = ("rpm", "tpm", "max_concurrency", "max_tokens_per_request", "quota_tokens")


async def _update(args: argparse.Namespace) -> int:
    """Changes the limits, models, priority or weight of every unrevoked key of a name: each router applies
    the change as its watch delivers it (no restart; streams in flight go on)."""
    changes = {name: getattr(args, name) for name in (*_LIMITS, "priority", "weight", "models", "expires")
               if getattr(args, name) is not None}
    if not changes:
        print("baton: nothing to change (give --rpm, --tpm, --max-concurrency, ...)", file=sys.stderr)
        return 2
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        chosen = [(r, rev) for r, rev in await _records(client, args.cluster) if r.name == args.name and not r.revoked]
        if not chosen:
            print(f"baton: no unrevoked key named {args.name!r}", file=sys.stderr)
            return 2
        for record, revision in chosen:
            if not await _put(client, args.cluster, replace(record, **changes), revision):
                print(f"baton: key {record.key_id} changed meanwhile; run it again", file=sys.stderr)
                return 1
            print(f"baton: key {record.key_id} ({record.name}) updated: "
                  + " ".join(f"{k}={v}" for k, v in changes.items()))
    finally:
        await close_quietly(client)
    return 0


async def _usage(args: argparse.Namespace) -> int:
    """Each account's usage as the routers have charged it: tokens against the quota, this minute's requests
    and tokens (budget the routers hold, taken and not yet charged, in brackets), requests in flight, and the
    distinct client addresses that used its keys in the last 10 minutes (FLAGGED past --flag-addresses)."""
    import json

    from baton.router.ledger import WINDOW_S, LedgerId, read_usage
    from baton.router.usage import WINDOW_S as ADDRESS_WINDOW_S
    from baton.router.usage import usage_prefix

    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        records = await _records(client, args.cluster)
        minute = int(time.time() // WINDOW_S)
        window = int(time.time() // ADDRESS_WINDOW_S)
        rows = [("ACCOUNT", "NAMES", "QUOTA", "THIS MINUTE: REQUESTS", "TOKENS", "IN FLIGHT", "ADDRESSES")]
        accounts: dict[str, list[KeyRecord]] = {}
        for r, _ in records:
            accounts.setdefault(r.ledger_id, []).append(r)
        for account, keys in sorted(accounts.items()):
            newest = max(keys, key=lambda r: r.created)

            async def used(resource: str, window: int = 0):
                prefix = LedgerId(account, resource, window).prefix(args.cluster)
                return read_usage(await client.get_prefix(prefix), prefix)

            quota, rpm, tpm, conc = (await used("quota"), await used("rpm", minute), await used("tpm", minute),
                                     await used("concurrency"))

            def cell(u, limit: int) -> str:
                return f"{u.spent}/{limit or '-'} ({u.held})"

            seen: set[str] = set()  # the address hashes every router saw this window
            for kv in await client.get_prefix(f"{usage_prefix(args.cluster)}{account}/{window}/".encode()):
                try:
                    seen.update(json.loads(kv.value))
                except ValueError:
                    pass
            addresses = f"{len(seen)}" + (" FLAGGED" if len(seen) > args.flag_addresses else "")
            rows.append((account, ",".join(sorted({r.name for r in keys})), cell(quota, newest.quota_tokens),
                         cell(rpm, newest.rpm), cell(tpm, newest.tpm), f"{conc.held}/{newest.max_concurrency or '-'}",
                         addresses))
    finally:
        await close_quietly(client)
    print("\n".join(table(rows[0], rows[1:], left=len(rows[0]))))
    return 0


def _keys(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(args.keys_run(args))
    except (OSError, ValueError) as e:  # the secret file, a refused record
        print(f"baton: {e}", file=sys.stderr)
        return 2


def add_parser(sub) -> None:
    keys = sub.add_parser("keys", help="create, list, update, revoke and rotate API keys (for routers with "
                                        "--auth), and show their usage")
    what = keys.add_subparsers(dest="keys_command", required=True)

    def common(parser: argparse.ArgumentParser, secret: bool) -> None:
        parser.add_argument("--etcd", required=True, help="etcd URL (`baton up` prints its own)")
        parser.add_argument("--cluster", default="default", help="the cluster's name (default: default)")
        if secret:
            parser.add_argument("--cluster-secret-file", required=True, metavar="PATH",
                                help="the cluster's secret, as given to its routers (`baton up --auth` prints it)")
        parser.set_defaults(run=_keys)

    create = what.add_parser("create", help="make a key; it is printed once, alone on the last line")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--models", type=_models, default=None, metavar="M1,M2",
                        help="the models it may use (default: all)")
    for flag, text in (("--rpm", "requests per minute"), ("--tpm", "tokens per minute"),
                       ("--max-concurrency", "requests at once"),
                       ("--max-tokens-per-request", "max_tokens per request"), ("--quota-tokens", "tokens in all")):
        create.add_argument(flag, type=_count, default=0, metavar="N", help=f"{text} (0: no limit)")
    create.add_argument("--priority", type=int, default=0, metavar="P",
                        help="under overload, lower is shed first (negative: sheddable)")
    create.add_argument("--weight", type=int, default=1, metavar="W", help="its share in fair queuing (>= 1)")
    create.add_argument("--expires", type=_when, default=None, metavar="DATE", help="ISO 8601 date or time (UTC)")
    common(create, secret=True)
    create.set_defaults(keys_run=_create)

    listing = what.add_parser("list", help="every key's id, name, state, models and limits (never the key)")
    common(listing, secret=False)
    listing.set_defaults(keys_run=_list)

    revoke = what.add_parser("revoke", help="revoke a key (by id) or every key of a name")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--name")
    which.add_argument("--id")
    common(revoke, secret=False)
    revoke.set_defaults(keys_run=_revoke)

    update = what.add_parser("update", help="change the limits, models, priority or weight of the keys of a name "
                                            "(every router applies it live)")
    update.add_argument("--name", required=True)
    update.add_argument("--models", type=_models, default=None, metavar="M1,M2")
    for flag in ("--rpm", "--tpm", "--max-concurrency", "--max-tokens-per-request", "--quota-tokens"):
        update.add_argument(flag, type=_count, default=None, metavar="N", help="0: no limit")
    update.add_argument("--priority", type=int, default=None, metavar="P")
    update.add_argument("--weight", type=int, default=None, metavar="W")
    update.add_argument("--expires", type=_when, default=None, metavar="DATE")
    common(update, secret=False)
    update.set_defaults(keys_run=_update)

    usage = what.add_parser("usage", help="each account's usage: tokens charged against its quota, this minute's "
                                          "requests and tokens, requests in flight")
    usage.add_argument("--flag-addresses", type=int, default=20, metavar="N",
                       help="flag an account used from more than N client addresses in 10 minutes (default 20)")
    common(usage, secret=False)
    usage.set_defaults(keys_run=_usage)

    rotate = what.add_parser("rotate", help="a new key with the same settings; the old stays valid for --grace")
    rotate.add_argument("--name", required=True)
    rotate.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                        help=f"how long the old key still works (default {DEFAULT_GRACE_S:g})")
    common(rotate, secret=True)
    rotate.set_defaults(keys_run=_rotate)
