"""`microscope patch`: turn SAE steering edits into a weight patch (a PEFT LoRA adapter plus
microscope_patch.json) that reproduces them without the SAE, apply one to a prompt, or check one against an
audit. Heavy imports happen inside the commands, so `microscope --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_WINDOWS = 64  # the audit's first windows: the last quarter is held out for the fidelity figures


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "patch",
        help="export SAE steering edits as a weight patch (PEFT LoRA adapter), apply or check one",
        description="Add edits (F=+A / F=-A) become an exact bias on the block's last projection; clamps "
        "(F=A, F=0 ablates) a rank-r LoRA fitted by least squares, with its fidelity reported.",
    )
    ps = p.add_subparsers(dest="patch_command", required=True)
    store_help = "a folder or s3://bucket/prefix (default: the settings')"

    ex = ps.add_parser("export", help="fit a patch on the audit's windows and save it as an adapter")
    ex.add_argument("audit", metavar="AUDIT", help="a finished audit with an SAE on --hook")
    ex.add_argument("--hook", required=True, help="the SAE's hook, e.g. blocks.1.hook_resid_post")
    ex.add_argument("--feature", action="append", required=True, metavar="F=±A|F=A", help="an edit (repeatable)")
    ex.add_argument("--out", required=True, type=Path, help="the adapter's folder")
    ex.add_argument("--variant", default="fp", help="fp (default) or one of the audit's variants")
    ex.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help=f"calibration windows ({DEFAULT_WINDOWS})")
    ex.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(fn=cmd_export)

    ap = ps.add_parser("apply", help="the patched model's next token on a prompt, vs clean and SAE-steered")
    ap.add_argument("folder", metavar="DIR", type=Path)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--audit", required=True, help="the audit whose model the patch is applied to")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    ap.add_argument("--json", action="store_true")
    ap.set_defaults(fn=cmd_apply)

    im = ps.add_parser("import", help="check a patch against an audit's model and say what it is")
    im.add_argument("folder", metavar="DIR", type=Path)
    im.add_argument("--audit", required=True)
    im.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    im.add_argument("--json", action="store_true")
    im.set_defaults(fn=cmd_import)


def _store(args: argparse.Namespace) -> Any:
    from microscope.store import open_store

    return open_store(getattr(args, "store", None))


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from microscope.errors import InputError
    from microscope.modality import open_data
    from microscope.patches import make_patch, save_adapter
    from microscope.steering import parse_edit
    from microscope.steering_audit import open_lab

    edits = [parse_edit(f) for f in args.feature]
    if args.windows < 2:
        raise InputError("--windows must be at least 2 (one to fit, one held out)")
    store = _store(args)
    lab = open_lab(store, args.audit, args.hook, args.variant)
    if not lab.steerer.causal:
        raise InputError(f"audit {args.audit}'s model is not a causal LM: patch fidelity is measured on next tokens")
    data = open_data(lab.record.stages["ingest"], store)
    ids = getattr(data, "ids", None)
    if ids is None:
        raise InputError(f"audit {args.audit} has no token windows (image data): patches need text")
    windows = torch.from_numpy(ids[: args.windows].astype("int64"))  # [N, T]
    patch = make_patch(lab.steerer, edits, windows)
    sae = lab.record.saes[args.hook]
    manifest = {
        "audit": lab.record.audit_id,
        "model_digest": lab.record.model_digest,
        "weights_digest": lab.record.stages["ingest"].details.get("weights_digest"),
        "model_source": lab.record.model.source,
        "variant": args.variant,
        "hook": args.hook,
        "hook_module": lab.module_path,
        "sae": sae.details.get("prefix"),
        "features": sorted({e.feature for e in edits}),
        "max_activation": {str(e.feature): float(lab.max_acts[e.feature]) for e in edits},
    }
    files = save_adapter(patch, lab.steerer.model, args.out, manifest)
    # a copy in the store beside the audit, so the viewer's Lineage page lists it
    kept = f"patches/{lab.record.audit_id}/{Path(args.out).resolve().name}"
    for f in files:
        store.put_file(f"{kept}/{f.name}", f)
    out = {"out": str(args.out), "store_key": kept} | patch.describe() | {"fidelity": patch.fidelity}
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    f = patch.fidelity
    print(f"{args.out}: {patch.kind} patch of {patch.module} (rank {patch.rank}) for {', '.join(args.feature)}")
    exact = "exact" if patch.kind == "bias" else "least-squares fit"
    print(f"  {exact}; on {int(f['heldout_windows'])} held-out windows ({int(f['heldout_tokens'])} tokens):")
    print(f"  KL(steered ‖ patched) {f['kl_patched']:.4g} nats/token vs {f['kl_unpatched']:.4g} with no patch")
    print(f"  residual error at the hook ‖h_patched − h_steered‖/‖Δh‖ {f['rel_residual']:.4g}", end="")
    print(f", on the fit {f['fit_rel_residual']:.4g}" if "fit_rel_residual" in f else "")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from microscope import audits
    from microscope.patches import check_digest, load_adapter

    meta, patch = load_adapter(args.folder)
    record = audits.load(_store(args), args.audit)
    check_digest(meta, record.model_digest)
    out = {"folder": str(args.folder), "audit": record.audit_id} | meta
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    _describe(meta, patch, args.folder, sys.stdout)
    print(f"  matches audit {record.audit_id}'s model ({str(record.model_digest)[:16]}…)")
    return 0


def _describe(meta: dict[str, Any], patch: Any, folder: Path, f: Any) -> None:
    edits = ", ".join(f"{e.feature} {e.mode} {e.alpha:+g}" for e in patch.edits)
    print(f"{folder}: {patch.kind} patch of {patch.module} (rank {patch.rank}): {edits}", file=f)
    print(f"  from audit {meta.get('audit')} · SAE on {meta.get('hook')} · variant {meta.get('variant')}", file=f)
    fid = patch.fidelity
    if fid:
        print(f"  KL(steered ‖ patched) {fid['kl_patched']:.4g} (no patch {fid['kl_unpatched']:.4g})", file=f)


def cmd_apply(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel

    from microscope.errors import InputError
    from microscope.patches import check_digest, load_adapter
    from microscope.steering_audit import open_lab

    if args.top_k < 1:
        raise InputError("--top-k must be at least 1")
    meta, patch = load_adapter(args.folder)
    lab = open_lab(_store(args), args.audit, meta["hook"], meta.get("variant", "fp"))
    check_digest(meta, lab.record.model_digest)
    if not lab.steerer.causal:
        raise InputError(f"audit {args.audit}'s model is not a causal LM: there is no next token to show")
    ids = lab.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise InputError("--prompt has no tokens; give some text")
    steer = lab.steerer
    with steer._session():
        clean = steer.model(input_ids=steer._ids(ids)).logits[0, -1]
    steered = steer.forward(ids, patch.edits).logits[0, -1]
    model = PeftModel.from_pretrained(steer.model, str(args.folder)).eval()  # wraps the model in place
    with torch.no_grad():
        patched = model(input_ids=steer._ids(ids)).logits[0, -1]
    lp = {
        k: torch.log_softmax(v.double(), -1) for k, v in (("clean", clean), ("steered", steered), ("patched", patched))
    }
    kl = float((lp["steered"].exp() * (lp["steered"] - lp["patched"])).sum())
    tops = {k: _top(v, args.top_k, lab.tokenizer) for k, v in lp.items()}
    out = {"folder": str(args.folder), "audit": args.audit, "prompt": args.prompt, "kl_steered_patched": kl} | tops
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    _describe(meta, patch, args.folder, sys.stdout)
    print(f"  KL(SAE-steered ‖ patched) at the next token: {kl:.4g} nats")
    print(f"  {'clean':<28}{'SAE-steered':<28}{'patched':<28}")
    for row in zip(tops["clean"], tops["steered"], tops["patched"], strict=True):
        print("  " + "".join(f"{r['token']!r:<18}{r['p']:>8.3f}  " for r in row))
    return 0


def _top(logp: Any, k: int, tokenizer: Any) -> list[dict[str, Any]]:
    vals, idx = logp.topk(min(k, logp.shape[-1]))
    return [
        {"token_id": int(i), "token": tokenizer.decode([int(i)]), "p": float(v.exp())}
        for v, i in zip(vals, idx, strict=True)
    ]
