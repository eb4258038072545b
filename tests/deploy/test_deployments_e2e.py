"""The production path against a real Prefect server on PostgreSQL (Redis messaging): `make deploy`
twice, the trigger, the watch flow's idempotency, and an audit whose stages run as child flow runs of
the stage deployments on real `prefect worker` processes, with artifacts and Prefect results on S3
(moto_server).

No cluster runs here: the pools are registered as `process` pools (`DEPLOY_ARGS=--pool-type process`),
which run the same flow code that the Kubernetes worker would start in a pod; the Kubernetes side (the
job templates, the chart) is rendered and validated offline in the other tests of this folder.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NEEDS_PG_REDIS, REPO, VENV_BIN, make_bucket, make_deploy, run_cli, stop

pytestmark = [NEEDS_PG_REDIS, pytest.mark.scenario]

CONFIG = {
    "dataset": {"seq_len": 32, "max_tokens": 1024},
    "quantize": {"formats": ["fp16"]},
    "trace": {"layers": "all", "hooks": ["resid"], "batch_size": 8, "part_tokens": 512},
    "sae": {
        "hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        "expansion": 2,
        "k": 4,
        "batch_size": 128,
        "epochs": 1,
        "buffer_tokens": 512,
    },
    "metrics": {"weight_shards": 2, "sensitivity_windows": 1, "hutchinson_probes": 2, "cka_tokens": 128},
}
STAGES = ["ingest", "quantize", "trace", "sae", "metrics", "report"]


class Api:
    """The Prefect REST API, spoken directly (what the UI and any client sees)."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=30)

    def get(self, path: str) -> Any:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any] | list[Any] | None = None) -> Any:
        r = self.http.post(path, json=body or {})
        r.raise_for_status()
        return r.json() if r.content else None

    def flow_runs(self, **filters: Any) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"flow_runs": filters, "limit": 200})

    def deployment(self, name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/{name}")

    def wait_final(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fr = self.get(f"/flow_runs/{run_id}")
            if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} did not finish in {timeout_s} s")


@pytest.fixture(scope="module")
def env(prefect_on_postgres: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import os

    home = tmp_path_factory.mktemp("deploy-home")
    make_bucket(s3_endpoint, "audits")
    make_bucket(s3_endpoint, "ckpts")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MICROSCOPE_", "MLFLOW_", "PREFECT_"))},
        "PREFECT_API_URL": prefect_on_postgres,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/microscope-results",
        "MICROSCOPE_HOME": str(home / "ms"),
        "MICROSCOPE_STORE": "s3://audits/prod",
        "MICROSCOPE_S3_ENDPOINT_URL": s3_endpoint,
        "MICROSCOPE_EXECUTION": "deployments",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def api(prefect_on_postgres: str) -> Api:
    return Api(prefect_on_postgres)


@pytest.fixture(scope="module")
def checkpoints(tiny_gpt2_dir: Path, s3_endpoint: str) -> list[str]:
    """The tiny GPT-2 as two checkpoints of run7 in S3 (an HF folder each), as a trainer leaves them."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="t", aws_secret_access_key="t")
    uris = []
    for step in (4, 8):
        for f in sorted(tiny_gpt2_dir.iterdir()):
            s3.upload_file(str(f), "ckpts", f"run7/step-{step}/{f.name}")
        uris.append(f"s3://ckpts/run7/step-{step}")
    s3.put_object(Bucket="ckpts", Key="run7/notes.txt", Body=b"not a checkpoint")
    return uris


@pytest.fixture(scope="module")
def deployed(env: dict[str, str], api: Api) -> dict[str, Any]:
    """`make deploy` twice: the second run must change nothing."""
    return {"first": make_deploy(env), "second": make_deploy(env)}


def _cancel(api: Api, run_id: str) -> None:
    api.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLED"}, "force": True})


def test_make_deploy_is_idempotent(deployed: dict[str, Any], api: Api) -> None:
    assert "microscope-gpu (process): created" in deployed["first"]
    assert "microscope-gpu (process): unchanged" in deployed["second"]
    assert "microscope-cpu (process): unchanged" in deployed["second"]
    stages = (
        "ingest", "quantize", "trace", "sae", "metrics", "landscape", "robustness", "reliability", "attribution", "report"
    )  # fmt: skip
    names = {f"stage/{s}" for s in stages}
    deployments = {n: api.deployment(n) for n in ["audit/checkpoint", "watch/watch", *sorted(names)]}
    pools = {n: d["work_pool_name"] for n, d in deployments.items()}
    assert pools["audit/checkpoint"] == "microscope-gpu"
    for s in ("quantize", "trace", "sae", "landscape", "robustness", "reliability", "attribution"):
        assert pools[f"stage/{s}"] == "microscope-gpu", s
    for s in ("ingest", "metrics", "report"):
        assert pools[f"stage/{s}"] == "microscope-cpu", s
    assert len(api.post("/deployments/filter", {"limit": 100})) == 12  # nothing registered twice
    # the watch schedule exists, inactive; the checkpoint trigger is one automation after two deploys
    (sched,) = deployments["watch/watch"]["schedules"]
    assert sched["schedule"]["cron"] == "*/15 * * * *" and sched["active"] is False
    autos = [a for a in api.post("/automations/filter", {}) if a["name"] == "microscope-checkpoint-ready"]
    assert len(autos) == 1
    (action,) = autos[0]["actions"]
    assert action["type"] == "run-deployment" and action["deployment_id"] == deployments["audit/checkpoint"]["id"]


def test_checkpoint_ready_event_starts_one_audit(deployed: dict[str, Any], api: Api) -> None:
    """A training job on Prefect emits the event; the trigger starts the checkpoint deployment with the
    payload as parameters (typed: the step stays an integer; absent fields are null)."""
    dep = api.deployment("audit/checkpoint")
    from schemas.webhook import CheckpointReady

    msg = CheckpointReady(checkpoint="s3://ckpts/run9/step-1200", run_id="run9", step=1200, tags={"lr": "3e-4"})
    # what `prefect.events.emit_event(**msg.event())` sends, posted as the events API receives it
    event = msg.event() | {"occurred": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "id": str(uuid.uuid4())}
    api.post("/events", [event])
    deadline = time.monotonic() + 90
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not runs:
        runs = api.flow_runs(deployment_id={"any_": [dep["id"]]})
        runs = [r for r in runs if r["parameters"].get("run_id") == "run9"]
        time.sleep(1)
    assert len(runs) == 1, "the event started no audit"
    p = runs[0]["parameters"]
    assert p["model"] == "s3://ckpts/run9/step-1200" and p["step"] == 1200 and p["tags"] == {"lr": "3e-4"}
    assert p["dataset"] is None and p["config"] is None and p["stages"] is None and p["callback_url"] is None
    api.post("/events", [event])  # the same event delivered again (same id): still one audit
    time.sleep(5)
    again = [r for r in api.flow_runs(deployment_id={"any_": [dep["id"]]}) if r["parameters"].get("run_id") == "run9"]
    assert len(again) == 1
    _cancel(api, runs[0]["id"])  # no worker runs it: the checkpoint does not exist


def test_watch_starts_one_audit_per_new_checkpoint(
    deployed: dict[str, Any], checkpoints: list[str], env: dict[str, str], api: Api
) -> None:
    code = "import json, sys; from flows.watch import watch; print(json.dumps(watch(prefix=sys.argv[1])))"
    ticks = []
    for _ in range(2):  # two schedule ticks: the second starts nothing
        p = subprocess.run(
            [str(VENV_BIN / "python"), "-c", code, "s3://ckpts/run7"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        ticks.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert [(t["checkpoint"], t["step"], t["new"]) for t in ticks[0]] == [
        (u, s, True) for u, s in zip(checkpoints, (4, 8), strict=True)
    ]
    assert [t["new"] for t in ticks[1]] == [False, False]
    assert [t["flow_run_id"] for t in ticks[1]] == [t["flow_run_id"] for t in ticks[0]]
    dep = api.deployment("audit/checkpoint")
    runs = [r for r in api.flow_runs(deployment_id={"any_": [dep["id"]]}) if r["parameters"].get("run_id") == "run7"]
    assert sorted(r["parameters"]["step"] for r in runs) == [4, 8]
    for r in runs:
        _cancel(api, r["id"])


def test_a_stage_no_worker_picks_up_fails_naming_the_pool(
    deployed: dict[str, Any], checkpoints: list[str], corpus_file: Path, env: dict[str, str], api: Api, tmp_path: Path
) -> None:
    """No worker polls the CPU pool: the ingest stage's flow run is cancelled after the start timeout and
    the audit fails in one line naming the pool and the command that fixes it (never Late forever)."""
    args = ["run", "--model", checkpoints[0], "--dataset", str(corpus_file), "--stages", "ingest"]
    p = run_cli([*args, "--audit-id", "no-worker"], {**env, "MICROSCOPE_STAGE_START_TIMEOUT_S": "3"}, tmp_path, 300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "prefect worker start --pool microscope-cpu" in p.stderr, p.stderr[-3000:]
    (child,) = [fr for fr in api.flow_runs() if fr["name"] == "no-worker:ingest"]
    assert child["state"]["type"] == "FAILED" and "no worker started it within 3 s" in child["state"]["message"]


@pytest.fixture
def workers(env: dict[str, str], deployed: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    procs = []
    for pool in ("microscope-gpu", "microscope-cpu"):
        log = open(tmp_path / f"{pool}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    yield
    for proc, log in procs:
        stop(proc)
        log.close()


def test_checkpoint_deployment_runs_stages_as_child_flow_runs(
    workers: None, checkpoints: list[str], corpus_file: Path, env: dict[str, str], api: Api, s3_endpoint: str
) -> None:
    import boto3

    dep = api.deployment("audit/checkpoint")
    params = {
        "model": checkpoints[0],
        "dataset": str(corpus_file),
        "config": CONFIG,
        "run_id": "run7",
        "step": 4,
        "stages": STAGES,
        "audit_id": "run7-step4",
    }
    fr = api.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    done = api.wait_final(fr["id"], 600)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert done["name"] == "run7-step4"

    # every stage ran as a child flow run of its stage deployment
    children = _children(api, fr["id"])
    by_dep = {}
    for c in children:
        assert c["state"]["type"] == "COMPLETED", (c["name"], c["state"])
        by_dep.setdefault(api.get(f"/deployments/{c['deployment_id']}")["name"], []).append(c["name"])
    assert sorted(by_dep) == ["ingest", "metrics", "quantize", "report", "sae", "trace"]
    assert by_dep["quantize"] == ["run7-step4:quantize[fp16]"]
    assert sorted(by_dep["trace"]) == ["run7-step4:trace", "run7-step4:trace[fp16]"]  # fp and variant side by side
    assert sorted(by_dep["sae"]) == [
        "run7-step4:sae[blocks.0.hook_resid_post]",
        "run7-step4:sae[blocks.1.hook_resid_post]",
    ]  # one flow run per hook, side by side
    assert sorted(by_dep["metrics"]) == ["run7-step4:metrics", "run7-step4:weights-0", "run7-step4:weights-1"]

    # the audit record and report are in S3, and so are Prefect's results
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="t", aws_secret_access_key="t")
    rec = json.loads(s3.get_object(Bucket="audits", Key="prod/audits/run7-step4.json")["Body"].read())
    assert rec["status"] == "completed", rec.get("error")
    assert {s: rec["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "completed")
    assert {s: r["status"] for s, r in rec["variants"]["fp16"].items()} == {
        "quantize": "completed",
        "trace": "completed",
    }
    assert rec["report_uri"].startswith("s3://audits/prod/") and rec["run_id"] == "run7" and rec["step"] == 4
    assert set(rec["saes"]) == set(CONFIG["sae"]["hooks"])
    results = s3.list_objects_v2(Bucket="audits", Prefix="prod/prefect-results/").get("KeyCount", 0)
    assert results >= len(children), "Prefect results are not on S3"


def _children(api: Api, parent_id: str) -> list[dict[str, Any]]:
    """Flow runs whose parent task run belongs to the audit's flow run (run_deployment's subflows)."""
    task_runs = api.post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [parent_id]}}, "limit": 200})
    ids = [t["id"] for t in task_runs]
    return api.post("/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": ids}}, "limit": 200})
