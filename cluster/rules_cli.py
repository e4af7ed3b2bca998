"""`baton rules`: set, list and delete the content rules every router applies live (common/rules.py).

`set` writes a whole rule (a new one, or in place of the one of that name); each router applies it from the
next request it admits, with no restart, and streams in flight keep the rules they started with.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from baton.common.membership import close_quietly, etcd_client
from baton.common.rules import TARGETS, RuleRecord, rules_prefix

from baton.cluster.status import table

RPC_TIMEOUT_S = 5.0


def _names(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be names separated by commas, got {text!r}")
    return items


def _targets(text: str) -> list[str]:
    items = _names(text)
    if not set(items) <= set(TARGETS):
        raise argparse.ArgumentTypeError(f"must be some of {', '.join(TARGETS)}, got {text!r}")
    return items


async def _set(args: argparse.Namespace) -> int:
    record = RuleRecord(name=args.name, regex=args.regex or "", terms=args.terms or [], on=args.on,
                        keys=args.keys or [], case_sensitive=args.case_sensitive, window=args.window)
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        await client.put(f"{rules_prefix(args.cluster)}{record.name}".encode(), record.to_json())
    finally:
        await close_quietly(client)
    print(f"baton: rule {record.name} set (on {', '.join(record.on)}; matches span at most {record.span()} "
          f"characters)")
    return 0


async def _list(args: argparse.Namespace) -> int:
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        kvs = await client.get_prefix(rules_prefix(args.cluster).encode())
    finally:
        await close_quietly(client)
    rows = [("NAME", "ON", "KEYS", "SPAN", "PATTERN")]
    for kv in kvs:
        try:
            r = RuleRecord.from_json(kv.value)
        except ValueError as e:
            print(f"baton: warning: skipping the rule at {kv.key.decode(errors='replace')}: {e}", file=sys.stderr)
            continue
        pattern = f"/{r.regex}/" if r.regex else "terms: " + ", ".join(r.terms)
        rows.append((r.name, ",".join(r.on), ",".join(r.keys) or "*", str(r.span()), pattern))
    print("\n".join(table(rows[0], rows[1:], left=len(rows[0]))))
    return 0


async def _delete(args: argparse.Namespace) -> int:
    client = etcd_client(args.etcd, RPC_TIMEOUT_S)
    try:
        deleted = await client.delete(f"{rules_prefix(args.cluster)}{args.name}".encode())
    finally:
        await close_quietly(client)
    if not deleted:
        print(f"baton: no rule named {args.name!r}", file=sys.stderr)
        return 2
    print(f"baton: rule {args.name} deleted")
    return 0


def _rules(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(args.rules_run(args))
    except ValueError as e:  # a rule its record refuses (a regex that does not compile, ...)
        print(f"baton: {e}", file=sys.stderr)
        return 2


def add_parser(sub) -> None:
    rules = sub.add_parser("rules", help="set, list and delete content rules (prompts refused, output screened)")
    what = rules.add_subparsers(dest="rules_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--etcd", required=True, help="etcd URL (`baton up` prints its own)")
        parser.add_argument("--cluster", default="default", help="the cluster's name (default: default)")
        parser.set_defaults(run=_rules)

    put = what.add_parser("set", help="add a rule, or replace the rule of that name")
    put.add_argument("name")
    pattern = put.add_mutually_exclusive_group(required=True)
    pattern.add_argument("--regex", metavar="PATTERN", help="a Python regular expression")
    pattern.add_argument("--terms", type=_names, metavar="T1,T2", help="words or phrases, matched as whole words")
    put.add_argument("--on", type=_targets, default=list(TARGETS), metavar="prompt,output",
                     help="what it screens (default: both)")
    put.add_argument("--keys", type=_names, default=None, metavar="NAME1,NAME2",
                     help="the API key names it applies to (default: every caller)")
    put.add_argument("--case-sensitive", action="store_true")
    put.add_argument("--window", type=int, default=0, metavar="CHARS",
                     help="the most characters a match spans (default: the pattern's longest match; 256 for a "
                          "pattern without a bound): output is held back this much")
    common(put)
    put.set_defaults(rules_run=_set)

    listing = what.add_parser("list", help="every rule")
    common(listing)
    listing.set_defaults(rules_run=_list)

    delete = what.add_parser("delete", help="delete a rule")
    delete.add_argument("name")
    common(delete)
    delete.set_defaults(rules_run=_delete)
