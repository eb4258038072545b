"""`microscope steer`: the feature lab on the command line. Turn SAE features of a finished audit's model up,
down or off on a prompt and compare the clean and edited next token (and continuation), with the KL
between them. Heavy imports happen inside the command, so `microscope --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    st = sub.add_parser(
        "steer",
        help="steer a model through its SAE features: clean vs edited next token, KL",
        description="FEATURE=+A / FEATURE=-A adds ±A times the feature's max activation along its decoder "
        "direction (=+0 changes nothing); FEATURE=A clamps it to A times its max activation (=0 ablates).",
    )
    st.add_argument("audit", metavar="AUDIT", help="a finished audit with an SAE on --hook")
    st.add_argument("--hook", required=True, help="the SAE's hook, e.g. blocks.1.hook_resid_post")
    st.add_argument("--feature", action="append", required=True, metavar="F=±A|F=A", help="an edit (repeatable)")
    st.add_argument("--prompt", required=True)
    st.add_argument("--variant", default="fp", help="fp (default) or one of the audit's variants, e.g. nf4")
    st.add_argument("--positions", default="all", help="all (default), prompt, or a token range START:END")
    st.add_argument("--top-k", type=int, default=10, help="next tokens listed (default 10)")
    st.add_argument("--continue", dest="continuation", type=int, default=0, help="greedy tokens to generate")
    st.add_argument(
        "--off-target",
        type=int,
        default=4,
        metavar="N",
        help="the edit's cost on the audit's last N token windows (KL, Δ perplexity; 0: skip; default 4)",
    )
    st.add_argument(
        "--store", default=argparse.SUPPRESS, help="a folder or s3://bucket/prefix (default: the settings')"
    )
    st.add_argument("--json", action="store_true", help="one JSON object on stdout (includes the KL)")
    st.set_defaults(fn=cmd_steer)


def positions(text: str) -> Any:
    if text in ("all", "prompt"):
        return text
    start, colon, end = text.partition(":")
    if not colon or not start.isdigit() or not end.isdigit() or int(start) >= int(end):
        raise ValueError(f"--positions {text!r}: write all, prompt or a token range START:END with START < END")
    return (int(start), int(end))


def cmd_steer(args: argparse.Namespace) -> int:
    from microscope.steering import parse_edit
    from microscope.steering_audit import nearest_texts, open_lab
    from microscope.store import open_store

    edits = [parse_edit(f) for f in args.feature]
    where = positions(args.positions)
    if args.top_k < 1 or args.continuation < 0 or args.off_target < 0:
        raise ValueError("--top-k must be at least 1, --continue and --off-target at least 0")
    store = open_store(args.store)
    lab = open_lab(store, args.audit, args.hook, args.variant)
    ids = lab.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("--prompt has no tokens; give some text")
    res = lab.steerer.compare(ids, edits, where, args.top_k, args.continuation)
    out = {"audit": lab.record.audit_id, "hook": args.hook, "variant": args.variant, "prompt": args.prompt} | res
    if args.off_target:
        import torch

        from microscope.modality import open_data

        held_out = open_data(lab.record.stages["ingest"], store).ids[-args.off_target :]
        out["off_target"] = lab.steerer.off_target(torch.from_numpy(held_out.astype("int64")), edits, where)
    tok = lab.tokenizer
    for key in ("top_clean", "top_edited"):
        if key in out:
            out[key] = [{"token_id": i, "token": tok.decode([i]), "p": p} for i, p in out[key]]
    for key in ("continuation_clean", "continuation_edited"):
        if key in out:
            out[key] = tok.decode(out[key])
    if not lab.steerer.causal:  # an encoder: which of the audit's texts the edited embedding now sits nearest
        out |= nearest_texts(lab, store, ids, edits, where)
    if args.json:
        print(json.dumps(out, indent=2, allow_nan=False, default=float))
        return 0
    _print(out, sys.stdout)
    return 0


def _print(out: dict[str, Any], f: Any) -> None:
    edits = ", ".join(f"{e['feature']} {e['mode']} {e['alpha']:+g}" for e in out["edits"])
    print(f"{out['audit']} · {out['hook']} · {out['variant']} · {edits} at {out['positions']}", file=f)
    for row in out.get("features", []):
        print(f"  feature {row['feature']}: activation {row['before_mean']:.4g} → {row['after_mean']:.4g}", file=f)
    print(f"  residual shift ‖Δh‖ {out['residual_shift']:.4g} · edited pass {1000 * out['seconds']:.0f} ms", file=f)
    cost = out.get("off_target")
    if cost and "kl_mean" in cost:
        print(
            f"  off-target on {cost['windows']} held-out windows: KL {cost['kl_mean']:.4g} nats per token, "
            f"Δ perplexity {cost['delta_ppl']:+.4g}",
            file=f,
        )
    elif cost:
        print(
            f"  off-target on {cost['windows']} held-out windows: embedding cosine {cost['embedding_cosine']:.6f}",
            file=f,
        )
    if "kl" in out:
        print(f"  KL(clean ‖ edited) at the next token: {out['kl']:.4g} nats", file=f)
        print(f"  {'clean':<28}{'edited':<28}", file=f)
        for a, b in zip(out["top_clean"], out["top_edited"], strict=True):
            print(f"  {a['token']!r:<18}{a['p']:>8.3f}  {b['token']!r:<18}{b['p']:>8.3f}", file=f)
        if out.get("continuation_clean") is not None and (out["continuation_clean"] or out["continuation_edited"]):
            print(f"  clean:  {out['prompt']}{out['continuation_clean']}", file=f)
            print(f"  edited: {out['prompt']}{out['continuation_edited']}", file=f)
    else:
        print(f"  embedding cosine clean vs edited: {out['embedding_cosine']:.6f}", file=f)
        for which in ("clean", "edited"):
            print(f"  nearest of the audit's texts, {which}:", file=f)
            for n in out.get(f"nearest_{which}", []):
                print(f"    {n['cosine']:.3f}  #{n['window']}  {n['text']!r}", file=f)
