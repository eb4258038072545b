"""`microscope`: run, show and list audits. Heavy imports happen inside the commands, so `--help`
answers at once."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

EXIT_INPUT = 2  # bad input: config, file, checkpoint, dataset
EXIT_FAILED = 1  # the audit ran and a stage failed


def _env_defaults() -> None:
    """Settings of the libraries we drive (not ours: those live in microscope.settings)."""
    from microscope.settings import get_settings

    home = get_settings().home_dir
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect-results"))
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not sys.stderr.isatty():  # a log file or CI: no carriage-return progress redraws
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    # The temporary server's first start migrates a fresh database: ~20 s on 2 cores, Prefect's default
    # patience; give it room instead of failing a laptop's first audit.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "PREFECT_API_URL" not in os.environ:  # `microscope up` is running here: use its server, not a temporary one
        from flows.local_stack import running_stack

        if stack := running_stack(home):
            os.environ["PREFECT_API_URL"] = stack["prefect_api_url"]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Everything printed while the flow runs (ours, Prefect's, subprocesses') goes to stderr, so
    stdout carries only the JSON record."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _fail(msg: str, code: int = EXIT_INPUT) -> int:
    print(f"microscope: error: {msg}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _tags(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise ValueError(f"--tag {p!r} is not key=value; write it like --tag branch=main")
        out[key] = value
    return out


def cmd_run(args: argparse.Namespace) -> int:
    _env_defaults()
    from flows.preload import adopt_environment

    adopt_environment()  # in a warm process's child: Prefect's settings from this command's environment
    from flows.stages import expand_stages
    from microscope import audits
    from microscope.models.loading import resolve
    from microscope.stages.ingest import dataset_fingerprint
    from microscope.store import open_store
    from schemas.config import resolve_config
    from schemas.stages import check_audit_id

    # Everything a user can get wrong is checked before anything starts (exit 2, one line), cheapest first.
    audit_id = check_audit_id(args.audit_id) if args.audit_id is not None else audits.new_audit_id()
    cfg = resolve_config(args.config, {"model.source": args.model, "dataset.path": args.dataset})
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages is not None else []
    if args.stages is not None and not stages:
        raise ValueError(f"--stages {args.stages!r} names no stage; leave it out to run every stage")
    expand_stages(stages)
    tags = _tags(args.tag)
    ref = resolve(cfg.model)
    dataset_fingerprint(cfg.dataset.path)
    if cfg.gate.rules is not None:
        from microscope.gates import load_rules

        load_rules(cfg.gate.rules)
    store = open_store(args.store)
    print(f"microscope: audit {audit_id} of {ref.source} (store {store.uri})", file=sys.stderr)
    store.check_writable()  # a read-only store is refused now, not after every stage ran
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "microscope: no PREFECT_API_URL: Prefect starts a temporary server (`microscope up` keeps one)",
            file=sys.stderr,
        )
        from flows.server_guard import guard_temporary_server

        guard_temporary_server()

    with _stdout_to_stderr():
        from flows.audit import audit

        state = audit(
            model=cfg.model.source,
            dataset=cfg.dataset.path,
            config=args.config,
            run_id=args.run_id,
            step=args.step,
            tags=tags,
            stages=stages,
            store=store.uri,
            audit_id=audit_id,
            callback_url=args.callback_url,
            return_state=True,
        )
    try:
        record = audits.load(store, audit_id)
    except Exception:  # noqa: BLE001 -- the flow died before saving its record
        exc = state.result(raise_on_failure=False)
        return _fail(f"audit {audit_id} crashed before saving its record: {exc}", EXIT_FAILED)
    _print_record(record, args.json)
    if record.status.value in ("failed", "partial"):
        return _fail(record.error or "a stage failed", EXIT_INPUT if _is_input_error(record) else EXIT_FAILED)
    return 0


def _is_input_error(record: Any) -> bool:
    return any(r.details.get("input_error") for r in record.stages.values())


def _print_record(record: Any, as_json: bool) -> None:
    if as_json:
        print(record.model_dump_json(indent=2))
        return
    print(f"audit {record.audit_id}: {record.status.value}")
    for r in record.stages.values():
        secs = "" if r.seconds is None else f" {r.seconds:.2f}s"
        err = f"  {r.error}" if r.error else ""
        print(f"  {r.stage:<8} {r.status.value:<9}{secs}{err}")
    for name, recs in record.variants.items():
        for r in recs.values():
            secs = "" if r.seconds is None else f" {r.seconds:.2f}s"
            made = r.details.get("produced")
            extra = f"  made as {made}" if made and made != name else ""
            print(
                f"  {r.stage + '[' + name + ']':<16} {r.status.value:<9}{secs}{extra}{'  ' + r.error if r.error else ''}"
            )
    for hook, r in record.saes.items():
        secs = "" if r.seconds is None else f" {r.seconds:.2f}s"
        figs = f"  FVU {r.metrics['fvu']:.3f}, L0 {r.metrics['l0']:.1f}" if "fvu" in r.metrics else ""
        print(f"  sae[{hook}] {r.status.value}{secs}{figs}{'  ' + r.error if r.error else ''}")
    gate = record.stages.get("gate")
    if gate is not None and gate.status.value == "completed":
        from schemas.gates import GateVerdict

        print(f"gate           {GateVerdict.model_validate(gate.details).summary()}")
    if bad := (record.stages["ingest"].details.get("nonfinite") if "ingest" in record.stages else None):
        from microscope.models.loading import describe_nonfinite

        print(f"warning        {describe_nonfinite(bad)} (model.allow_nonfinite): figures that read them mean little")
    if record.model_digest:
        print(f"model digest   {record.model_digest[:16]}")
    if record.report_uri:
        print(f"report         {record.report_uri}")
    if record.stages.get("trace") and record.stages["trace"].details.get("prefix"):
        print(f"activations    {record.store_uri}/{record.stages['trace'].details['prefix']}")
    print(f"mlflow         {record.mlflow_tracking_uri} (run {record.mlflow_run_id})")


def cmd_show(args: argparse.Namespace) -> int:
    from microscope import audits
    from microscope.store import open_store

    record = audits.load(open_store(args.store), args.audit_id)
    _print_record(record, args.json)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from microscope import audits
    from microscope.store import open_store

    unreadable: list[str] = []
    records = audits.list_all(open_store(args.store), run_id=args.run, unreadable=unreadable)
    for key in unreadable:
        print(f"microscope: warning: skipped {key}: not a readable audit record", file=sys.stderr)
    if args.json:
        print(json.dumps([json.loads(r.model_dump_json()) for r in records], indent=2))
        return 0
    if not records and args.run is not None:
        print(f"no audits of run {args.run!r}; `microscope list` shows every audit", file=sys.stderr)
    elif not records:
        print("no audits yet; start one with `microscope run --model PATH --dataset FILE`", file=sys.stderr)
    for r in records:
        model = (r.architecture.class_name if r.architecture else "?") + f" {(r.model_digest or '')[:12]}"
        step = f"  {r.run_id} step {r.step}" if r.run_id is not None else ""
        print(f"{r.audit_id}  {r.status.value:<9}  {model}  {r.dataset_source}{step}{_gate_column(r)}")
    return 0


def _gate_column(record: Any) -> str:
    """`  gate pass vs step 400` (or fail, naming the failed rules): the verdict a run's list is read for."""
    gate = record.stages.get("gate")
    if gate is None or gate.status.value != "completed":
        return ""
    from schemas.gates import GateVerdict

    v = GateVerdict.model_validate(gate.details)
    against = (
        f" vs step {v.baseline_step}" if v.baseline_step is not None else f" ({v.baseline_reason or 'no baseline'})"
    )
    failed = [r.rule for r in v.failed]
    return f"  gate {v.verdict}{against}" + (f": {', '.join(failed)}" if failed else "")


def cmd_search(args: argparse.Namespace) -> int:
    from microscope import audits
    from microscope.errors import InputError
    from microscope.store import open_store
    from microscope.vectors import FEATURES, LAYERS, VectorIndex

    parts = args.like.split(":")
    want = 2 if args.what == "layers" else 3
    if len(parts) != want:
        form = "AUDIT:LAYER" if args.what == "layers" else "AUDIT:HOOK:FEATURE"
        raise InputError(f"--like {args.like!r} is not {form}, e.g. `microscope search {args.what} --like {form}`")
    audit_id = audits.load(open_store(args.store), parts[0]).audit_id
    if args.what == "layers":
        key: tuple = (audit_id, "fp", parts[1])
    else:
        if not parts[2].isdigit():
            raise InputError(f"feature {parts[2]!r} is not a number")
        key = (audit_id, parts[1], int(parts[2]))
    with VectorIndex() as index:
        hits = index.similar(LAYERS if args.what == "layers" else FEATURES, key, args.k)
    if not hits:
        raise InputError(f"{args.like} is not in the index; run the audit's metrics/sae stages first")
    if args.json:
        print(json.dumps(hits, indent=2, default=str))
        return 0
    for h in hits:
        what = (
            h["layer"] if args.what == "layers" else f"{h['hook']}:{h['feature']} {' '.join(h.get('top_tokens', []))}"
        )
        print(f"{h['score']:.4f}  {h['audit_id']}  {what}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.config import AuditConfig
    from schemas.gates import GateRules
    from schemas.records import AuditRecord
    from schemas.webhook import CheckpointReady

    model = {"config": AuditConfig, "audit": AuditRecord, "webhook": CheckpointReady, "gates": GateRules}[args.which]
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    """SAE features of AUDIT_A matched one to one to AUDIT_B's (stored once per pair under matches/)."""
    from microscope import audits
    from microscope.errors import InputError
    from microscope.feature_matching import describe, match_features
    from microscope.store import open_store

    store = open_store(args.store)
    rec_a, rec_b = audits.load(store, args.audit_a), audits.load(store, args.audit_b)
    hooks = [args.hook] if args.hook else sorted(set(rec_a.saes) & set(rec_b.saes))
    if not hooks:
        raise InputError(
            f"audits {rec_a.audit_id} and {rec_b.audit_id} have no SAE on a common hook "
            f"({', '.join(sorted(rec_a.saes)) or 'none'} vs {', '.join(sorted(rec_b.saes)) or 'none'})"
        )
    found = {h: match_features(store, rec_a, rec_b, h) for h in hooks}
    if args.json:
        print(json.dumps({h: m.summary for h, m in found.items()}, indent=2))
        return 0
    print(f"{rec_a.audit_id} → {rec_b.audit_id}")
    for m in found.values():
        print(f"  {describe(m)}  ({store.uri_for(m.summary['key'])})")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    """Judge a finished audit against gate rules and a baseline, without recomputing anything: exit 0
    (pass or warn), 1 (fail), 2 (the rules, the audit or the baseline cannot be used)."""
    from microscope import audits, gates
    from microscope.store import open_store

    store = open_store(args.store)
    rec = audits.load(store, args.audit)
    source = args.rules or (rec.config.get("gate") or {}).get("rules") or "gates"
    rules, where = gates.load_rules(source)
    verdict = gates.judge(store, rec, rules, baseline=args.baseline, source=where)
    if args.save:
        from microscope import tracking

        rec.stages["gate"] = gates.stage_record(verdict)
        audits.save(store, rec)
        if rec.mlflow_run_id:
            tracking.log_gate(rec.mlflow_run_id, verdict)
    if args.json:
        print(verdict.model_dump_json(indent=2))
    else:
        print(gates.text(verdict))
    return gates.EXIT[verdict.verdict]


def cmd_view(args: argparse.Namespace) -> int:
    """The Streamlit viewer on the store (`--store`, else the settings'): reads finished results only."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("dashboard")
    if spec is None or spec.origin is None:
        raise ValueError("the viewer (dashboard/) is not installed here; reinstall microscope with `make install`")
    app = Path(spec.origin).parent / "app.py"
    env = {**os.environ, **({"MICROSCOPE_STORE": args.store} if getattr(args, "store", None) else {})}
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host]
    cmd += ["--server.port", str(args.port), "--server.headless", "true"]
    os.execve(sys.executable, cmd, env)  # streamlit replaces this process: a signal to it stops the viewer
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Prefect server + the audit deployment served here + the webhook receiver, until interrupted."""
    _env_defaults()
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")  # a checkpoint's audit starts within a second
    from flows.local_stack import LocalStack, serve_audits, webhook_secret
    from microscope.settings import get_settings

    home = get_settings().home_dir
    secret_note = webhook_secret(home)
    stack = LocalStack(home, port=args.port, webhook_port=args.webhook_port, host=args.host, ui=not args.no_ui)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the children too, as Ctrl-C does
    try:
        info = stack.start()
        ui = f", UI {info['prefect_ui_url']}" if info["prefect_ui_url"] else ""
        print(f"microscope up: Prefect {info['prefect_api_url']}{ui}", file=sys.stderr)
        print(f"microscope up: webhook {info['webhook_url']} ({secret_note})", file=sys.stderr)
        print(f"microscope up: serving {get_settings().audit_deployment}, store {get_settings().store_uri}, "
              f"logs {home / 'logs'}; Ctrl-C stops", file=sys.stderr)  # fmt: skip
        serve_audits(args.concurrency)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        return _fail(str(exc), EXIT_FAILED)
    finally:
        stack.stop()
    return 0


def cmd_webhook_serve(args: argparse.Namespace) -> int:
    from deployments.webhook import create_app, serve

    create_app()  # the configuration errors (no secret, no Prefect API) as one line, before uvicorn starts
    serve(args.host, args.port)
    return 0


def cmd_webhook_secret(_args: argparse.Namespace) -> int:
    import base64
    import secrets

    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from microscope.integrations.notify import Notifier, NotifyError
    from schemas.webhook import CheckpointReady

    fields = {"checkpoint": args.checkpoint, "run_id": args.run_id, "step": args.step, "dataset": args.dataset}
    fields |= {"config": args.config, "tags": _tags(args.tag), "callback_url": args.callback_url}
    fields |= {"stages": [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None}
    try:
        msg = CheckpointReady(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"--{'-'.join(str(p) for p in first['loc']).replace('_', '-')}: {first['msg']}") from None
    try:
        notifier = Notifier(url=args.url, secret=args.secret, give_up_after_s=args.timeout)
        local = args.checkpoint if args.upload else None
        accepted = notifier.send(msg, upload_to=args.upload, local_path=local)
    except NotifyError as exc:
        return _fail(str(exc), EXIT_FAILED)
    if args.json:
        print(accepted.model_dump_json(indent=2))
    else:
        print(f"{'already started' if accepted.duplicate else 'audit started'}: flow run {accepted.flow_run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microscope", description="Audit neural-network checkpoints.")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show Prefect's engine lines and libraries' logs and warnings too"
    )
    p.add_argument(
        "--store",
        help="artifact store: a folder or s3://bucket/prefix (default: $MICROSCOPE_STORE or .microscope/artifacts)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an audit")
    r.add_argument("--model", help="HF folder, hub id, or a .safetensors/.pt state dict (overrides model.source)")
    r.add_argument("--dataset", help=".txt/.jsonl/.parquet file or HF dataset name (overrides dataset.path)")
    r.add_argument("--config", help="audit YAML config, or a name under examples/ (demo, demo_digits)")
    r.add_argument("--stages", help="comma-separated stages to run (plus what they need); default all")
    r.add_argument("--audit-id", help="id for this audit (default: timestamp + random)")
    r.add_argument("--run-id", help="the training run this checkpoint belongs to (microscope list --run)")
    r.add_argument("--step", type=int, help="the checkpoint's training step within --run-id")
    r.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag on the audit (repeatable)")
    r.add_argument("--callback-url", help="POST the audit's signed result (and gate verdict) here when it ends")
    r.add_argument("--json", action="store_true", help="print the audit record as JSON on stdout")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("show", help="show one audit")
    s.add_argument("audit_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_show)

    ls = sub.add_parser("list", help="list audits (oldest first; a training run's in step order)")
    ls.add_argument("--run", help="only this training run's audits, in step order")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)

    se = sub.add_parser("search", help="nearest layers or SAE features across all audits (Qdrant)")
    se.add_argument("what", choices=["layers", "features"])
    se.add_argument("--like", required=True, help="AUDIT:LAYER (layers) or AUDIT:HOOK:FEATURE (features)")
    se.add_argument("-k", type=_positive_int, default=10, help="how many neighbours (at least 1)")
    se.add_argument("--json", action="store_true")
    se.set_defaults(fn=cmd_search)

    sc = sub.add_parser(
        "schema", help="print the JSON Schema of the config, the audit record, the webhook body or gates.yaml"
    )
    sc.add_argument("which", choices=["config", "audit", "webhook", "gates"])
    sc.set_defaults(fn=cmd_schema)

    m = sub.add_parser("match", help="match two audits' SAE features one to one (survived, drifted, split, lost, new)")
    m.add_argument("audit_a", metavar="AUDIT_A", help="the earlier audit (its features are labelled)")
    m.add_argument("audit_b", metavar="AUDIT_B", help="the later audit (its unmatched features are new)")
    m.add_argument("--hook", help="one SAE hook (default: every hook both audits trained an SAE on)")
    m.add_argument("--store", default=argparse.SUPPRESS, help="a folder or s3://bucket/prefix (default: the settings')")
    m.add_argument("--json", action="store_true", help="print the summary per hook as JSON")
    m.set_defaults(fn=cmd_match)

    g = sub.add_parser(
        "gate", help="judge a finished audit against gate rules and a baseline (exit 0 pass/warn, 1 fail, 2 error)"
    )
    g.add_argument("audit", help="the audit id (a unique prefix is enough)")
    g.add_argument(
        "--rules", help="gates.yaml, or a name under examples/ (default: the audit's gate.rules, else gates)"
    )
    g.add_argument(
        "--baseline", help="previous | first | none | AUDIT_ID | tag:KEY[=VALUE] (default: the rules' baseline)"
    )
    g.add_argument("--json", action="store_true", help="print the verdict as JSON")
    g.add_argument("--save", action="store_true", help="store the verdict in the audit's record and its MLflow run")
    g.set_defaults(fn=cmd_gate)

    v = sub.add_parser("view", help="open the results viewer (Streamlit) on the store")
    v.add_argument("--store", default=argparse.SUPPRESS, help="a folder or s3://bucket/prefix (default: the settings')")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8501)
    v.set_defaults(fn=cmd_view)

    up = sub.add_parser("up", help="run Prefect, the audit deployment and the webhook receiver here (a laptop)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=4200, help="the Prefect server's port (unless PREFECT_API_URL is set)")
    up.add_argument("--webhook-port", type=int, default=8080)
    up.add_argument("--concurrency", type=int, default=1, help="audits run side by side (default 1)")
    up.add_argument("--no-ui", action="store_true", help="start the Prefect server without its UI")
    up.set_defaults(fn=cmd_up)

    wh = sub.add_parser("webhook", help="the receiver training jobs POST 'checkpoint ready' to")
    whs = wh.add_subparsers(dest="webhook_command", required=True)
    ws = whs.add_parser("serve", help="run the receiver (needs MICROSCOPE_WEBHOOK_SECRET and PREFECT_API_URL)")
    ws.add_argument("--host", default="127.0.0.1")
    ws.add_argument("--port", type=int, default=8080)
    ws.set_defaults(fn=cmd_webhook_serve)
    whs.add_parser("secret", help="print a new signing secret (whsec_...)").set_defaults(fn=cmd_webhook_secret)

    n = sub.add_parser("notify", help="tell the receiver a checkpoint is ready (signed, retried)")
    n.add_argument("--checkpoint", required=True, help="the checkpoint's URI (s3://...) or path as the pods see it")
    n.add_argument("--run-id", required=True)
    n.add_argument("--step", required=True, type=int)
    n.add_argument("--url", help="the receiver's /v1/checkpoints URL (default: $MICROSCOPE_WEBHOOK_URL)")
    n.add_argument("--secret", help="signing secret (default: the first of $MICROSCOPE_WEBHOOK_SECRET)")
    n.add_argument("--dataset")
    n.add_argument("--config", help="an audit config name or path as the pods see it")
    n.add_argument("--stages", help="comma-separated stages (default all)")
    n.add_argument("--tag", action="append", metavar="KEY=VALUE")
    n.add_argument("--callback-url", help="where the receiver's audit POSTs its signed result when it ends")
    n.add_argument("--upload", metavar="S3_PREFIX", help="upload the local checkpoint here first, send its s3:// URI")
    n.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds of retrying")
    n.add_argument("--json", action="store_true")
    n.set_defaults(fn=cmd_notify)

    from flows.lab import add_parser as add_steer  # the command's heavy imports happen when it runs

    add_steer(sub)
    from flows.patch_cmd import add_parser as add_patch

    add_patch(sub)
    from flows.sae_cmd import add_parser as add_sae

    add_sae(sub)
    from flows.store_cmd import add_parser as add_store

    add_store(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from flows.console import quiet_console

    quiet_console(args.verbose)
    if args.command == "run" and not args.verbose:
        from flows.preload import run_in_warm_process

        if (code := run_in_warm_process(argv)) is not None:
            return code
    from microscope.errors import MicroscopeError
    from schemas.config import ConfigError

    try:
        return int(args.fn(args))
    except (ConfigError, MicroscopeError) as exc:
        return _fail(str(exc))
    except ValueError as exc:  # stage names and other argument checks
        return _fail(str(exc))
    except OSError as exc:  # an unreadable, looping or over-long path given on the command line or in a config
        from microscope.errors import describe_os_error

        return _fail(describe_os_error(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; finished stages are kept, re-run to resume", 130)


if __name__ == "__main__":
    sys.exit(main())
