"""Create or update Microscope's work pools, then register every deployment of deployments/prefect.yaml.

    python deployments/register.py                      # Kubernetes pools from deployments/pools/*.json
    python deployments/register.py --pool-type process  # the same pools as local process pools (tests, a laptop)

Idempotent: a pool whose template already matches is left alone, and `prefect deploy` updates the
deployments, their schedules and their triggers' automations in place, so a second run changes
nothing. With an s3:// store it also saves the `s3-bucket/microscope-results` block where Prefect
persists task and flow results, so retries and cache hits work across pods. Needs PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages resolve

from deployments.pool_templates import POOLS, load_template  # noqa: E402

if TYPE_CHECKING:
    from microscope.settings import Settings

RESULTS_BLOCK = "microscope-results"  # s3-bucket/microscope-results: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool-type", choices=["kubernetes", "process"], default="kubernetes")
    p.add_argument("--gpu-image", help="image of GPU-pool jobs (default: the template's)")
    p.add_argument("--cpu-image", help="image of CPU-pool jobs (default: the template's)")
    p.add_argument("--namespace", help="namespace the audit jobs run in")
    p.add_argument("--service-account", help="service account of the audit pods")
    p.add_argument("--credentials-secret", help="Secret with S3 / MLflow / Qdrant settings, as envFrom")
    p.add_argument("--pool-overrides", type=Path, help="folder with gpu.json / cpu.json: job-variable defaults")
    p.add_argument("--project-dir", help="where the project lives in the job's image or machine")
    p.add_argument("--watch-prefix", default=settings.watch_prefix, help="default: MICROSCOPE_WATCH_PREFIX")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for the Prefect API")
    p.add_argument("--skip-deploy", action="store_true", help="pools (and the results block) only")
    p.add_argument(
        "--gate-notify-block",
        default=None,
        help="notification block <type>/<name> that failed gates are sent to (default: MICROSCOPE_GATE_NOTIFY_BLOCK)",
    )
    return p.parse_args(argv)


def wait_for_api(timeout_s: float, api_url: str) -> None:
    """The chart's hook runs beside a server that may still be starting."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            if client.api_healthcheck() is None:
                return
        if time.monotonic() > deadline:
            sys.exit(f"error: the Prefect API at {api_url} did not answer; check PREFECT_API_URL")
        time.sleep(3)


def pool_overrides(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.pool_overrides and (args.pool_overrides / f"{kind}.json").exists():
        out |= json.loads((args.pool_overrides / f"{kind}.json").read_text())
    flags = {
        "image": args.gpu_image if kind == "gpu" else args.cpu_image,
        "namespace": args.namespace,
        "service_account_name": args.service_account,
        "env_from_secret": args.credentials_secret,
    }
    return out | {k: v for k, v in flags.items() if v}


def base_job_template(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.pool_type == "kubernetes":
        return load_template(kind, pool_overrides(kind, args))
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def ensure_pools(args: argparse.Namespace) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for kind, name in POOLS.items():
            template = base_job_template(kind, args)
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=args.pool_type, base_job_template=template))
                print(f"work pool {name} ({args.pool_type}): created")
                continue
            if pool.type != args.pool_type:
                sys.exit(
                    f"error: work pool {name} exists with type {pool.type}, not {args.pool_type}; "
                    f"delete it (prefect work-pool delete {name}) or pass --pool-type {pool.type}"
                )
            if pool.base_job_template == template:
                print(f"work pool {name} ({args.pool_type}): unchanged")
            else:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
                print(f"work pool {name} ({args.pool_type}): updated")


def ensure_results_block(s: Settings) -> None:
    """Prefect's results on the S3 store, so a retry or a cache hit on one pod finds another pod's result."""
    if not s.store_uri.startswith("s3://"):
        return
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    bucket, _, prefix = s.store_uri.removeprefix("s3://").partition("/")
    # no keys in the block: pods read theirs from the credentials Secret (AWS_* in the environment)
    creds = AwsCredentials(aws_client_parameters=AwsClientParameters(endpoint_url=s.s3_endpoint_url))
    block = S3Bucket(
        bucket_name=bucket, bucket_folder=f"{prefix.strip('/')}/prefect-results".strip("/"), credentials=creds
    )
    block.save(RESULTS_BLOCK, overwrite=True)
    print(f"result storage: s3-bucket/{RESULTS_BLOCK} -> s3://{bucket}/{block.bucket_folder}")


GATE_AUTOMATION = "microscope-gate-failed"
GATE_SUBJECT = "Microscope: gate failed for {{ event.resource['microscope.run_id'] or 'audit' }} step {{ event.resource['microscope.step'] }}"
GATE_BODY = """{{ event.payload.summary }}

Audit: {{ event.resource['microscope.audit_id'] }} (run {{ event.resource['microscope.run_id'] }}, step {{ event.resource['microscope.step'] }})
Baseline: {{ event.payload.baseline_audit_id or 'none' }}
Failed rules: {{ event.payload.failed | join(', ') }}
Report: {{ event.payload.report or 'none' }}"""


def ensure_gate_automation(block: str | None) -> str:
    """The automation that sends `block`'s message on every `microscope.gate.failed` event (created, or
    updated in place); without a block, one line saying how to name one. Returns what it did."""
    if not block:
        return "gate alerts: off (name a notification block with MICROSCOPE_GATE_NOTIFY_BLOCK=<type>/<name>)"
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    kind, _, name = block.partition("/")
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(name=name, block_type_slug=kind)
        except Exception:  # noqa: BLE001 -- ObjectNotFound and friends: the message says what to do
            sys.exit(
                f"error: no notification block {block!r} in Prefect; create it (prefect block create {kind}) first"
            )
    wanted = Automation(
        name=GATE_AUTOMATION,
        description="Microscope: tell the training team when a checkpoint fails its regression gates.",
        trigger=EventTrigger(
            expect={"microscope.gate.failed"},
            match={"prefect.resource.id": "microscope.audit.*"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=doc.id, subject=GATE_SUBJECT, body=GATE_BODY)],
    )
    try:
        found = Automation.read(name=GATE_AUTOMATION)
    except ValueError:
        wanted.create()
        return f"gate alerts: automation {GATE_AUTOMATION} created, sending to {block}"
    same = found.model_dump(exclude={"id", "owner_resource"}) == wanted.model_dump(exclude={"id", "owner_resource"})
    if same:
        return f"gate alerts: automation {GATE_AUTOMATION} unchanged"
    wanted.id = found.id
    wanted.update()
    return f"gate alerts: automation {GATE_AUTOMATION} updated, sending to {block}"


def deploy(args: argparse.Namespace) -> None:
    default_dir = "/opt/microscope" if args.pool_type == "kubernetes" else str(ROOT)
    env = {
        **os.environ,
        "MICROSCOPE_PROJECT_DIR": args.project_dir or default_dir,
        "MICROSCOPE_WATCH_PREFIX": args.watch_prefix,
        "PREFECT_CLI_PROMPT": "false",
    }
    cmd = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(HERE / "prefect.yaml")]
    prefect = Path(sys.executable).with_name("prefect")
    cmd[0] = str(prefect) if prefect.exists() else "prefect"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        sys.exit(f"error: prefect deploy exited {done.returncode}; see its output above")
    names = [line.split("'")[1] for line in done.stdout.splitlines() if "Deployment '" in line and "'" in line]
    print(f"deployments registered: {', '.join(dict.fromkeys(names)) or 'see prefect deployment ls'}")


def main(argv: list[str] | None = None) -> None:
    from microscope.settings import get_settings

    settings = get_settings()  # read once, here: the flags' defaults, the Prefect API, the store
    args = parse_args(argv, settings)
    if not settings.prefect_api_url:
        sys.exit("error: PREFECT_API_URL is not set; point it at the Prefect server to register with")
    wait_for_api(args.wait, settings.prefect_api_url)
    ensure_pools(args)
    ensure_results_block(settings)
    if not args.skip_deploy:
        deploy(args)
    print(ensure_gate_automation(args.gate_notify_block or settings.gate_notify_block))


if __name__ == "__main__":
    main()
