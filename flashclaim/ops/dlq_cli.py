"""``flashclaim dlq``: the operator's view of dead-lettered claims.

Exit codes: 0 done; 1 nothing matched (or not found); 2 cannot reach the broker or bad
arguments; 3 cancelled at the confirmation prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from flashclaim.core import broker
from flashclaim.core.settings import Settings
from flashclaim.ops.deadletters import (
    BadSelection,
    DeadLetter,
    DeadLetterQueue,
    Selection,
    local_operator,
    seconds,
)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered claims")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str, select: bool = False) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(name, help=text, parents=[common])
        a.add_argument("--json", action="store_true", help="machine-readable output")
        a.add_argument(
            "--scan",
            type=int,
            default=10_000,
            help="read at most this many messages per queue (default 10000)",
        )
        if select:
            a.add_argument("--reason", help="e.g. poison, failed, delivery_limit, rejected")
            a.add_argument("--coupon", help="only this coupon's claims")
            a.add_argument(
                "--older-than",
                type=_seconds,
                metavar="SECONDS",
                help="first dead-lettered at least this long ago",
            )
        return a

    action("stats", "depth, counts by reason and error type, oldest age")
    a = action("list", "peek (nothing is removed or reordered)", select=True)
    a.add_argument("--limit", type=int, default=50)
    a = action("show", "one message in full: headers (x-death decoded), body, error")
    a.add_argument("message_id")
    a = action(
        "replay", "republish to the original exchange, then remove from the DLQ", select=True
    )
    a.add_argument("message_ids", nargs="*", metavar="ID")
    a.add_argument("--all", action="store_true", help="every message")
    a.add_argument("--dry-run", action="store_true", help="show what would move; move nothing")
    a.add_argument("--rate", type=float, help="at most this many messages per second")
    a = action("purge", "remove messages for good", select=True)
    a.add_argument("message_ids", nargs="*", metavar="ID")
    a.add_argument("--all", action="store_true", help="every message")
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    a = action("export", "write messages as JSON lines (nothing is removed)", select=True)
    a.add_argument("--output", "-o", help="file (default: standard output)")
    p.set_defaults(func=run, service="dlq")


def _seconds(text: str) -> float:
    try:
        return seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite, non-negative number of seconds"
        ) from None


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))


def _selection(args: argparse.Namespace) -> Selection:
    return Selection.of(
        getattr(args, "message_ids", None),
        getattr(args, "reason", None),
        getattr(args, "coupon", None),
        getattr(args, "older_than", None),
        getattr(args, "all", False),
    )


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    connection = await broker.connect(settings.amqp_url, "flashclaim dlq", wait_seconds=5)
    try:
        dlq = DeadLetterQueue(connection, settings.topology())
        return await ACTIONS[args.action](dlq, args, sys.stdout)
    finally:
        await connection.close()


async def _stats(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    stats = await dlq.stats(args.scan)
    if args.json:
        print(json.dumps(stats, indent=2), file=out)
        return 0
    for queue, s in stats.items():
        age = "-" if s["oldest_age_seconds"] is None else f"{s['oldest_age_seconds']:.0f}s"
        print(f"{queue}: {s['depth']} messages, oldest {age}", file=out)
        for title, counts in (("reason", s["by_reason"]), ("error type", s["by_error_type"])):
            for key, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                print(f"  {title:<11} {key:<28} {n}", file=out)
    return 0


def _table(letters: list[DeadLetter], out: TextIO) -> None:
    columns = (
        "message_id",
        "coupon",
        "user",
        "reason",
        "error_type",
        "delivery_count",
        "first_death",
        "last_death",
    )
    rows = [[str(x.summary()[c] or "-") for c in columns] for x in letters]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)), file=out)


async def _select(dlq: DeadLetterQueue, args: argparse.Namespace) -> list[DeadLetter]:
    return await dlq.select(_selection(args), args.scan)


async def _list(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    letters = (await _select(dlq, args))[: args.limit]
    if args.json:
        print(json.dumps([x.summary() for x in letters], indent=2), file=out)
    else:
        _table(letters, out)
        print(f"{len(letters)} shown", file=out)
    return 0 if letters else 1


async def _show(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    letter = await dlq.find(args.message_id, args.scan)
    if letter is None:
        print(f"no dead letter with message id {args.message_id}", file=sys.stderr)
        return 1
    print(json.dumps(letter.full(), indent=2, default=str), file=out)
    return 0


def _required(args: argparse.Namespace) -> Selection:
    try:
        return Selection.of(
            args.message_ids, args.reason, args.coupon, args.older_than, args.all, required=True
        )
    except BadSelection as exc:
        raise BadSelection(f"{exc} (or --all)") from None


async def _replay(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    selection = _required(args)
    done = 0

    def progress(letter: DeadLetter) -> None:
        nonlocal done
        done += 1
        if not args.json:
            print(f"replayed {letter.message_id} ({done})", file=sys.stderr, flush=True)

    moved = await dlq.replay(
        selection,
        dry_run=args.dry_run,
        rate=args.rate,
        scan=args.scan,
        on_each=progress,
        operator=local_operator(),
    )
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "count": len(moved),
                    "message_ids": [x.message_id for x in moved],
                }
            ),
            file=out,
        )
    else:
        _table(moved, out)
        verb = "would be replayed (dry run: nothing moved)" if args.dry_run else "replayed"
        print(f"{len(moved)} {verb}", file=out)
    return 0 if moved else 1


async def _purge(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    selection = _required(args)
    matching = await dlq.select(selection, args.scan)
    if not matching:
        print("nothing matches", file=out)
        return 1
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                "flashclaim dlq purge: confirm with --yes (no terminal to ask on)", file=sys.stderr
            )
            return 3
        prompt = f"Remove {len(matching)} dead letters for good? [y/N] "
        answer = await asyncio.to_thread(input, prompt)
        if answer.strip().lower() not in ("y", "yes"):
            print("cancelled", file=out)
            return 3
    # Exactly what was counted and confirmed: not whatever matches by the time of a
    # second scan (new dead letters may have arrived meanwhile).
    confirmed = Selection(message_ids=frozenset(x.message_id for x in matching))
    removed = await dlq.purge(confirmed, args.scan, operator=local_operator())
    if args.json:
        print(
            json.dumps({"count": len(removed), "message_ids": [x.message_id for x in removed]}),
            file=out,
        )
    else:
        print(f"{len(removed)} purged", file=out)
    return 0


async def _export(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    letters = await _select(dlq, args)
    lines = [json.dumps(x.full(), default=str) for x in letters]
    if args.output:
        text = "".join(line + "\n" for line in lines)
        await asyncio.to_thread(Path(args.output).write_text, text)
        print(f"{len(lines)} exported to {args.output}", file=sys.stderr)
    else:
        for line in lines:
            print(line, file=out)
    return 0 if letters else 1


ACTIONS = {
    "stats": _stats,
    "list": _list,
    "show": _show,
    "replay": _replay,
    "purge": _purge,
    "export": _export,
}
