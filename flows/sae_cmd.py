"""`microscope sae import PATH --audit ID --hook H`: attach an SAE trained elsewhere (saved in SAELens' layout)
to an audited model; its features are described on the audit's traced activations, as the audit's own SAEs
are. Heavy imports happen inside the command, so `microscope --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    sae = sub.add_parser("sae", help="SAEs from elsewhere: import one saved by SAELens onto an audit")
    sae_sub = sae.add_subparsers(dest="sae_command", required=True, metavar="{import}")
    imp = sae_sub.add_parser(
        "import",
        help="attach a SAELens SAE (cfg.json + sae_weights.safetensors) to an audit's traced hook",
        description="Reads a standard (ReLU), TopK or JumpReLU SAE saved by SAELens, checks its width against "
        "the audit's traced hook, copies it into the store and describes its features on the audit's traced "
        "activations. It goes into the audit's SAEs under the hook, or HOOK@import where the audit trained its own.",
    )
    imp.add_argument("path", metavar="PATH", type=Path, help="the folder SAELens saved the SAE in")
    imp.add_argument("--audit", required=True, help="the audit (an id or a unique prefix of one)")
    imp.add_argument("--hook", required=True, help="the traced hook it reads, e.g. blocks.1.hook_resid_post")
    imp.add_argument(
        "--store", default=argparse.SUPPRESS, help="a folder or s3://bucket/prefix (default: the settings')"
    )
    imp.add_argument("--json", action="store_true", help="one JSON object on stdout")
    imp.set_defaults(fn=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from microscope import audits
    from microscope.sae.external import attach, record_key, summary
    from microscope.store import open_store

    store = open_store(getattr(args, "store", None))
    rec = attach(store, args.audit, args.hook, args.path)
    record = audits.load(store, args.audit)
    key = next((k for k, r in record.saes.items() if r.details.get("prefix") == rec.details["prefix"]), None)
    out = summary(store, record.audit_id, key or record_key(record, args.hook))
    if args.json:
        print(json.dumps(out, indent=2, allow_nan=False, default=float))
        return 0
    _print(out, sys.stdout)
    return 0


def _print(out: dict[str, Any], f: Any) -> None:
    m, feats = out["metrics"], out["features"]
    print(f"{out['audit']} · saes[{out['key']!r}] · {out['architecture']} {out['d_in']}→{out['d_sae']}", file=f)
    figs = " · ".join(f"{k} {m[k]:.4g}" for k in ("fvu", "l0", "ce_recovered") if k in m)
    print(f"  {figs}" if figs else "  (no reconstruction figures)", file=f)
    for k, why in out["undefined"].items():
        print(f"  {k}: undefined ({why})", file=f)
    med = feats["median_density"]
    print(
        f"  features: {feats['count']}, dead {feats['dead']}, dense {feats['dense']}, median density "
        f"{'n/a' if med is None else f'{med:.3g}'}",
        file=f,
    )
    for t in out["top_features"]:
        print(f"  #{t['feature']} density {t['density']:.3g}: {t['context']!r}", file=f)
