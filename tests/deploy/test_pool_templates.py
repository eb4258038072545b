"""The GPU and CPU Kubernetes work-pool templates, rendered the way prefect-kubernetes' worker renders them.

Every manifest goes through `KubernetesWorkerJobConfiguration.from_template_and_values` and
`prepare_for_flow_run` (or the worker's own `resolve_for_flow_run` against a real Prefect server) and is then
checked against the Kubernetes 1.33 OpenAPI schema in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
from kubernetes_validate.utils import ValidationError as K8sValidationError
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from deployments.pool_templates import POOLS, POOLS_DIR, load_template
from tests.conftest import REPO, VENV_BIN, cli_env

K8S_VERSION = "1.33.0"
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_OVERRIDES: dict[str, Any] = {
    "gpu_count": 4,
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [GPU_TAINT, {"key": "dedicated", "operator": "Equal", "value": "audit", "effect": "NoSchedule"}],
    "memory_request": "96Gi",
    "memory_limit": "120Gi",
    "shm_size": "32Gi",
}


def k8s_validate(manifest: dict[str, Any]) -> None:
    """Strict Kubernetes schema validation, failing with the offending path instead of the whole schema."""
    try:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    except K8sValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"Job manifest invalid for Kubernetes {K8S_VERSION} at /{path}: {exc.message}", pytrace=False)


async def _render(kind: str, template: dict[str, Any], values: dict[str, Any], api: str) -> dict[str, Any]:
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=client)
    flow_run = FlowRun(id=uuid.uuid4(), name="calm-otter", flow_id=uuid.uuid4(), job_variables=values)
    config.prepare_for_flow_run(
        flow_run,
        flow=Flow(id=flow_run.flow_id, name="audit"),
        work_pool=WorkPool(name=POOLS[kind], type="kubernetes", base_job_template=template),
        worker_name="test-worker",
    )
    return config.job_manifest


def render(kind: str, api: str, values: dict[str, Any] | None = None, template: dict[str, Any] | None = None) -> dict:
    """The Job manifest a Kubernetes worker would submit for a flow run on pool `kind`, strictly validated."""
    manifest = asyncio.run(_render(kind, template or load_template(kind), values or {}, api))
    k8s_validate(manifest)
    return manifest


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(manifest)["containers"]
    return only


def assert_common(manifest: dict[str, Any], kind: str) -> None:
    """What every Microscope job has, on either pool."""
    spec, pod, box = manifest["spec"], pod_spec(manifest), container(manifest)
    # completions/parallelism belong to the Job spec; the upstream default puts them in the pod spec.
    assert (spec["completions"], spec["parallelism"]) == (1, 1)
    assert "completions" not in pod and "parallelism" not in pod
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 86400
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "microscope-audit"
    assert box["envFrom"] == [{"secretRef": {"name": "microscope-credentials"}}]
    assert box["image"] == f"microscope:{'cuda' if kind == 'gpu' else 'cpu'}"
    assert box["args"] == ["prefect", "flow-run", "execute"]
    assert {"name": "PREFECT__FLOW_RUN_ID", "value": manifest["metadata"]["labels"]["prefect.io/flow-run-id"]} in (
        box["env"]
    )
    # /dev/shm: a memory-backed emptyDir with a size limit, mounted where PyTorch DataLoader workers look
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in box["volumeMounts"]
    # hardening
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert box["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for key in ("memory", "ephemeral-storage"):
        assert key in box["resources"]["requests"] and key in box["resources"]["limits"], key
    assert pod_labels(manifest)["microscope/pool"] == kind


def pod_labels(manifest: dict[str, Any]) -> dict[str, str]:
    return manifest["spec"]["template"]["metadata"]["labels"]


# ---- rendering -----------------------------------------------------------------------------------


def test_gpu_pool_defaults_render_a_valid_gpu_job(prefect_api: str) -> None:
    manifest = render("gpu", prefect_api)
    assert_common(manifest, "gpu")
    res, pod = container(manifest)["resources"], pod_spec(manifest)
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert res["requests"] == {"cpu": "8", "memory": "48Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": 1}
    # cpu_limit defaults to unset: the key is dropped, not rendered as null
    assert res["limits"] == {"memory": "64Gi", "ephemeral-storage": "100Gi", "nvidia.com/gpu": 1}
    assert pod["tolerations"] == [GPU_TAINT]
    assert pod["nodeSelector"] == {}
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


@pytest.mark.parametrize("via", ["job_variables", "template_defaults"])
def test_gpu_pool_overrides(prefect_api: str, via: str) -> None:
    """Overrides work both as a deployment's job variables and as the pool's defaults (load_template)."""
    if via == "job_variables":
        manifest = render("gpu", prefect_api, values=GPU_OVERRIDES)
    else:
        manifest = render("gpu", prefect_api, template=load_template("gpu", GPU_OVERRIDES))
    assert_common(manifest, "gpu")
    res, pod = container(manifest)["resources"], pod_spec(manifest)
    # an integer variable placed as a whole value renders as a JSON integer, which a Quantity accepts
    assert res["limits"]["nvidia.com/gpu"] == 4 and res["requests"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert GPU_TAINT in pod["tolerations"] and len(pod["tolerations"]) == 2
    assert {"key": "dedicated", "operator": "Equal", "value": "audit", "effect": "NoSchedule"} in pod["tolerations"]
    assert res["requests"]["memory"] == "96Gi" and res["limits"]["memory"] == "120Gi"
    assert res["requests"]["ephemeral-storage"] == "50Gi" and res["limits"]["ephemeral-storage"] == "100Gi"
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}


def test_gpu_pool_job_without_gpu(prefect_api: str) -> None:
    """prefect.yaml's orchestrating `checkpoint` deployment: CUDA image, no GPU, off the GPU nodes' taint."""
    values = {"gpu_count": 0, "tolerations": [], "memory_request": "4Gi", "memory_limit": "8Gi"}
    manifest = render("gpu", prefect_api, values=values)
    assert_common(manifest, "gpu")
    res = container(manifest)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == 0 and res["limits"]["nvidia.com/gpu"] == 0  # explicit, valid
    assert pod_spec(manifest)["tolerations"] == []
    assert res["limits"]["memory"] == "8Gi"


def test_cpu_pool_has_no_gpu_resource(prefect_api: str) -> None:
    manifest = render("cpu", prefect_api)
    assert_common(manifest, "cpu")
    res, pod = container(manifest)["resources"], pod_spec(manifest)
    assert "nvidia.com/gpu" not in json.dumps(manifest)  # no limit of 0 either: no GPU resource at all
    assert res["requests"] == {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "20Gi"}
    assert res["limits"] == {"memory": "16Gi", "ephemeral-storage": "40Gi"}
    assert pod["tolerations"] == []
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_cpu_pool_overrides(prefect_api: str) -> None:
    values = {"gpu_count": 0, "cpu_limit": "4", "node_selector": {"pool": "cpu"}, "ephemeral_storage_limit": "64Gi"}
    manifest = render("cpu", prefect_api, values=values)
    assert_common(manifest, "cpu")
    res = container(manifest)["resources"]
    assert res["limits"] == {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "64Gi"}
    assert pod_spec(manifest)["nodeSelector"] == {"pool": "cpu"}
    assert "nvidia.com/gpu" not in json.dumps(manifest)


def test_upstream_default_template_fails_strict_validation(prefect_api: str) -> None:
    """Why the pools carry their own manifest: prefect-kubernetes' default puts completions/parallelism in the
    pod spec, which strict validation rejects. If this starts passing, upstream fixed it."""
    default = json.loads(
        subprocess.run(
            [str(VENV_BIN / "prefect"), "work-pool", "get-default-base-job-template", "--type", "kubernetes"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    manifest = asyncio.run(_render("gpu", default, {}, prefect_api))
    with pytest.raises(K8sValidationError, match="completions"):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


# ---- load_template -------------------------------------------------------------------------------


def test_load_template_sets_defaults_and_leaves_files_alone() -> None:
    template = load_template("gpu", {"gpu_count": 2, "node_selector": {"a": "b"}})
    props = template["variables"]["properties"]
    assert props["gpu_count"]["default"] == 2 and props["node_selector"]["default"] == {"a": "b"}
    assert props["memory_limit"]["default"] == "64Gi"  # untouched
    pristine = json.loads((POOLS_DIR / "gpu.json").read_text())
    assert load_template("gpu") == pristine
    assert pristine["variables"]["properties"]["gpu_count"]["default"] == 1


@pytest.mark.parametrize(
    ("kind", "overrides", "match"),
    [
        ("gpu", {"gpu_cnt": 2}, r"no job variable 'gpu_cnt'; valid variables: .*gpu_count"),
        ("gpu", {"gpu_count": "4"}, r"'gpu_count': '4' is not of type 'integer'"),
        ("gpu", {"gpu_count": -1}, r"'gpu_count': -1 is less than the minimum of 0"),
        ("gpu", {"tolerations": {"key": "x"}}, r"'tolerations': .* is not of type 'array'"),
        ("gpu", {"node_selector": {"zone": 1}}, r"'node_selector': 1 is not of type 'string'"),
        ("gpu", {"image_pull_policy": "Sometimes"}, r"'image_pull_policy': 'Sometimes' is not one of"),
        ("cpu", {"gpu_count": 1}, r"microscope-cpu job variable 'gpu_count': 1 is greater than the maximum of 0"),
        ("tpu", {}, r"unknown pool kind 'tpu'"),
    ],
)
def test_load_template_rejects_bad_overrides(kind: str, overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_template(kind, overrides)


# ---- what Prefect's server accepts ---------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(POOLS))
def test_templates_pass_prefect_schema_checks(kind: str) -> None:
    """The checks the server runs: the pool's template (every placeholder declared) and job variables."""
    template = load_template(kind)
    WorkPoolCreate(name=POOLS[kind], type="kubernetes", base_job_template=template)  # validate_base_job_template
    is_valid_schema(template["variables"])
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    validate(defaults, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    overrides = GPU_OVERRIDES if kind == "gpu" else {"cpu_limit": "4"}
    validate(overrides, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)


@pytest.mark.parametrize("kind", sorted(POOLS))
def test_prefect_work_pool_create_accepts_template(prefect_api: str, kind: str, tmp_path: Path) -> None:
    name = f"{POOLS[kind]}-{uuid.uuid4().hex[:6]}"
    path = REPO / "deployments" / "pools" / f"{kind}.json"
    env = cli_env(tmp_path, prefect_api)
    cmd = [str(VENV_BIN / "prefect"), "work-pool", "create", name, "--type", "kubernetes"]
    done = subprocess.run([*cmd, "--base-job-template", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    async def stored() -> dict[str, Any]:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            async with get_client() as client:
                return (await client.read_work_pool(name)).base_job_template

    assert asyncio.run(stored()) == json.loads(path.read_text())

    # and the server does check: a placeholder without a variable is refused
    broken = json.loads(path.read_text())
    broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    cmd[3] = f"{name}-broken"
    done = subprocess.run(
        [*cmd, "--base-job-template", str(tmp_path / "broken.json")], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "deadline" in done.stdout + done.stderr, done.stdout + done.stderr


def test_worker_resolves_a_deployment_flow_run(prefect_api: str) -> None:
    """The whole worker path on a real server: pool → deployment job variables → flow-run job variables →
    `resolve_for_flow_run` (what KubernetesWorker runs before creating the Job) → a strictly valid manifest."""
    suffix = uuid.uuid4().hex[:6]

    async def scenario() -> tuple[dict[str, Any], list[tuple[int, bool]]]:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            async with get_client() as client:
                gpu = await client.create_work_pool(
                    WorkPoolCreate(
                        name=f"microscope-gpu-{suffix}", type="kubernetes", base_job_template=load_template("gpu")
                    )
                )
                cpu = await client.create_work_pool(
                    WorkPoolCreate(
                        name=f"microscope-cpu-{suffix}", type="kubernetes", base_job_template=load_template("cpu")
                    )
                )
                flow_id = await client.create_flow_from_name(f"sae-{suffix}")
                deployment_id = await client.create_deployment(
                    flow_id=flow_id,
                    name="sae",
                    work_pool_name=gpu.name,
                    entrypoint="flows/stages.py:sae_stage",
                    job_variables={"gpu_count": 2, "node_selector": {"pool": "gpu"}, "env": {"MICROSCOPE_X": "1"}},
                )
                flow_run = await client.create_flow_run_from_deployment(
                    deployment_id, job_variables={"memory_limit": "80Gi"}
                )
                config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                    flow_run, client=client, work_pool=gpu, worker_name="test-worker"
                )
                # the server validates job variables against the pool's schema
                rejected: list[tuple[int, bool]] = []
                for pool, bad in ((gpu.name, {"gpu_count": "two"}), (cpu.name, {"gpu_count": 1})):
                    try:
                        await client.create_deployment(
                            flow_id=flow_id, name=f"bad-{len(rejected)}", work_pool_name=pool, job_variables=bad
                        )
                    except httpx.HTTPStatusError as exc:
                        rejected.append((exc.response.status_code, "gpu_count" in exc.response.text))
                return config.job_manifest, rejected

    manifest, rejected = asyncio.run(scenario())
    k8s_validate(manifest)
    assert_common(manifest, "gpu")
    box = container(manifest)
    assert box["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert box["resources"]["limits"]["memory"] == "80Gi"
    assert pod_spec(manifest)["nodeSelector"] == {"pool": "gpu"}
    assert {"name": "MICROSCOPE_X", "value": "1"} in box["env"]
    assert pod_labels(manifest)["prefect.io/deployment-name"] == "sae"
    assert rejected == [(422, True), (422, True)], rejected
