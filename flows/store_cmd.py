"""`microscope gc` and `microscope delete`: free store space. Both print the plan and change nothing unless
`--yes` is given; a deletion that would break an audit is refused (exit 2, one line naming the audit and the
fix). The plans and the deletion are `microscope.store_admin`'s; heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
from typing import Any

STORE_HELP = "a folder or s3://bucket/prefix (default: the settings')"


def add_parser(sub: Any) -> None:
    gc = sub.add_parser(
        "gc",
        help="delete unused artifacts: prefixes no audit record references, temp and partial leftovers",
        description="Prints what would go and the space it frees; deletes only with --yes. Artifacts any audit "
        "record references, and stages being computed, are never touched.",
    )
    gc.add_argument("--yes", action="store_true", help="delete (default: print the plan only)")
    gc.add_argument("--store", default=argparse.SUPPRESS, help=STORE_HELP)
    gc.set_defaults(fn=cmd_gc)

    de = sub.add_parser(
        "delete",
        help="delete an audit (its record and the artifacts only it references) or a model's artifacts",
        description="Prints what would go and the space it frees; deletes only with --yes. Refused while the "
        "audit runs, or while another audit record references the artifacts.",
    )
    what = de.add_mutually_exclusive_group(required=True)
    what.add_argument("audit", metavar="AUDIT_ID", nargs="?", help="the audit id (a unique prefix is enough)")
    what.add_argument("--model", metavar="DIGEST", help="a model's digest (or a unique prefix): its artifacts")
    de.add_argument("--yes", action="store_true", help="delete (default: print the plan only)")
    de.add_argument("--store", default=argparse.SUPPRESS, help=STORE_HELP)
    de.set_defaults(fn=cmd_delete)


def _store(args: argparse.Namespace) -> Any:
    from microscope.store import open_store

    return open_store(getattr(args, "store", None))


def cmd_gc(args: argparse.Namespace) -> int:
    from microscope.store_admin import plan_gc

    return _carry_out(plan_gc(_store(args)), args.yes)


def cmd_delete(args: argparse.Namespace) -> int:
    from microscope.store_admin import plan_delete_audit, plan_delete_model

    store = _store(args)
    plan = plan_delete_model(store, args.model) if args.model else plan_delete_audit(store, args.audit)
    return _carry_out(plan, args.yes)


def _carry_out(plan: Any, yes: bool) -> int:
    from microscope.store_admin import execute, human_bytes

    if plan.empty:
        print(f"{plan.what}: nothing to delete in {plan.store.uri}")
        return 0
    print("\n".join(plan.lines()))
    if not yes:
        print("dry run: nothing was deleted; run again with --yes to delete")
        return 0
    freed = execute(plan)
    print(f"deleted: {human_bytes(freed)} freed ({freed:,} bytes)")
    return 0
