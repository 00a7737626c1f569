"""``tokenflow cache ls|clear|prune``: what tokenflow keeps on disk, and making it smaller.

    tokenflow cache ls [KIND...] [--json]
    tokenflow cache clear [KIND...] [--dry-run] [--json]
    tokenflow cache prune --max-size 10GB [KIND...] [--dry-run] [--json]

The kinds, the root rule, sizes, "last use" and what is never removed: ``tokenflow.io.caches``
and docs/caches.md. Imports no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import List

from tokenflow.config import parse_bytes
from tokenflow.errors import ConfigError
from tokenflow.io import caches

KINDS_HELP = ", ".join(caches.KIND_NAMES)


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="list, clear or prune the inversion, graph and compile caches",
                       description=f"tokenflow's caches, under one root ({caches.ROOT_RULE}). Kinds: {KINDS_HELP}. "
                       "Entries that a running process is writing, links and files that are not the "
                       "cache's are never removed.")
    actions = p.add_subparsers(dest="cache_action", metavar="{ls,clear,prune}")
    ls = actions.add_parser("ls", help="each cache kind: path, entries, size")
    clear = actions.add_parser("clear", help="remove every entry of the kinds named (all by default); asks nothing")
    prune = actions.add_parser("prune", help="remove the least recently used entries until the caches fit a size",
                               description="Removes entries oldest last use first (the newest access or modification "
                               "time of an entry's files; an inversion cache hit counts as a use) until the kinds "
                               "named hold at most --max-size. Entries in use stay.")
    prune.add_argument("--max-size", required=True, metavar="SIZE",
                       help="the most the kinds named may hold afterwards: 10GB (10^9 bytes), 16GiB, 800MB")
    for q in (ls, clear, prune):
        q.add_argument("kinds", nargs="*", metavar="KIND", help=f"only these kinds: {KINDS_HELP} (default all)")
        q.add_argument("--cache-dir", metavar="DIR", help=f"the cache root (default {caches.ENV_RULE})")
        q.add_argument("--json", action="store_true", help="print one JSON document")
    for q in (clear, prune):
        q.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def main(args: argparse.Namespace) -> int:
    if args.cache_action is None:
        raise ConfigError("tokenflow cache needs an action: ls, clear or prune (see tokenflow cache --help)")
    kinds = caches.kinds_named(args.kinds)
    root, source = caches.cache_root_and_source(args.cache_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"cache root {str(root)!r} is not a folder: point --cache-dir or $TOKENFLOW_CACHE at one")
    if args.cache_action == "ls":
        return _ls(root, source, kinds, args.json)
    max_bytes = parse_bytes(args.max_size, "--max-size") if args.cache_action == "prune" else None
    if max_bytes is None:
        removed, busy = caches.clear(root, kinds, dry_run=args.dry_run)
        before = after = None
    else:
        removed, busy, before, after = caches.prune(root, max_bytes, kinds, dry_run=args.dry_run)
    doc = {"root": str(root), "root_from": source, "action": args.cache_action, "dry_run": args.dry_run,
           "removed": [dataclasses.asdict(e) for e in removed], "removed_bytes": sum(e.bytes for e in removed),
           "busy": [dataclasses.asdict(e) for e in busy]}
    if max_bytes is not None:
        doc.update(max_bytes=max_bytes, bytes_before=before, bytes_after=after)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.kind}/{e.name}  {caches.human(e.bytes)}  (last used {caches.age(e.last_used)} ago)")
    for e in busy:
        print(f"left {e.kind}/{e.name}: {e.busy}")
    summary = f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, {caches.human(doc['removed_bytes'])}"
    if max_bytes is not None:
        summary += f"; {caches.human(before)} -> {caches.human(after)} (limit {caches.human(max_bytes)})"
        if after > max_bytes:
            summary += "; still over the limit: what is left is in use"
    print(f"{summary}  [{root}]")
    return 0


def _ls(root: Path, source: str, kinds: List[caches.Kind], as_json: bool) -> int:
    reports = caches.scan(root, kinds)
    if as_json:
        print(json.dumps({"root": str(root), "root_from": source, "exists": root.is_dir(),
                          "total_bytes": sum(r.bytes for r in reports),
                          "kinds": [r.to_json() for r in reports]}, indent=2))
        return 0
    print(f"cache root: {root}  (from {source}{'' if root.is_dir() else '; nothing cached yet'})")
    width = max(len(r.kind) for r in reports)
    print(f"  {'kind':{width}s} {'entries':>7s} {'size':>10s}  path")
    for r in reports:
        line = f"  {r.kind:{width}s} {len(r.entries):7d} {caches.human(r.bytes):>10s}  {r.path}"
        notes = [f"{n} {what}" for n, what in ((sum(e.busy is not None for e in r.entries), "in use"),
                                               (r.links, "links skipped"), (r.others, "other files left alone"))
                 if n]
        if r.not_followed is not None:
            notes.append(f"a link to {r.not_followed}: not followed")
        if r.unreadable is not None:
            notes.append(f"cannot be listed: {r.unreadable}")
        print(line + (f"  ({'; '.join(notes)})" if notes else ""))
    total = sum(r.bytes for r in reports)
    print(f"  {'total':{width}s} {sum(len(r.entries) for r in reports):7d} {caches.human(total):>10s}")
    return 0

