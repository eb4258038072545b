"""The Helm chart in helm/microscope, rendered offline by the real Helm library (helm-python-sdk)
and checked against the Kubernetes 1.33 schemas: lint, default and production values, pod
security, worker RBAC, secret handling, the GPU pool defaults, the values schema, the
registration hook, the ingresses and the viewer's authentication (oauth2-proxy sidecar or none)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[2] / "helm" / "microscope"
PRODUCTION = CHART / "ci" / "production-values.yaml"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "mic", "audits"
HOOK_KINDS = {"Job"}
SECRETISH = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|CONNECTION_URL")
# scheme://user:password@host — the password part must be a $(VAR) reference, never a literal
URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]+)@")


Doc = dict[str, Any]

# The viewer sits behind an oauth2-proxy OIDC sign-in by default, which needs these three values:
# render() adds them to every release that does not set `viewer.auth` itself.
OIDC: dict[str, Any] = {
    "oidcIssuerUrl": "https://login.acme.example/realms/ml",
    "clientId": "microscope-viewer",
    "existingSecret": "mic-viewer-oidc",
}


def with_oidc(values: dict[str, Any] | None) -> dict[str, Any]:
    """`values` with `viewer.auth` = OIDC unless they set `viewer.auth` themselves (not mutated)."""
    values = dict(values or {})
    viewer = dict(values.get("viewer") or {})
    if "auth" not in viewer:
        viewer["auth"] = dict(OIDC)
        values["viewer"] = viewer
    return values


def render(values: dict[str, Any] | None = None, name: str = RELEASE) -> tuple[list[Doc], str]:
    """Every manifest document of a release, and its NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(with_oidc(values), name=name, namespace=NAMESPACE)
    docs: list[Doc] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, notes


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION.read_text())


WITH_UIS: dict[str, Any] = {}  # the viewer and the webhook are both on by default


@pytest.fixture(scope="module")
def default() -> list[Doc]:
    return render(WITH_UIS)[0]


def test_viewer_and_webhook_are_on_by_default_and_can_be_turned_off() -> None:
    docs, notes = render()
    names = {d["metadata"]["name"] for d in docs}
    assert {"mic-microscope-viewer", "mic-microscope-webhook"} <= names
    assert "port-forward svc/mic-microscope-prefect-server 4200:4200" in notes and "viewer" in notes
    off, notes_off = render({"viewer": {"enabled": False}})
    assert "mic-microscope-viewer" not in {d["metadata"]["name"] for d in off} and "viewer" not in notes_off


@pytest.fixture(scope="module")
def production() -> list[Doc]:
    return render(production_values(), name="microscope")[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in of_kind(docs, kind)]}"
    return found[0]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(object, pod spec) for every Deployment, StatefulSet and Job."""
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield d, d["spec"]["template"]["spec"]


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def is_hook(doc: Doc) -> bool:
    return "helm.sh/hook" in doc["metadata"].get("annotations", {})


def pools(docs: list[Doc]) -> tuple[Doc, Doc]:
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-pools")]
    return json.loads(cm["data"]["gpu.json"]), json.loads(cm["data"]["cpu.json"])


# ---- lint and validity ------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, "production"])
def test_lint_has_no_errors(values: str | None) -> None:
    report = helm.lint(CHART, production_values() if values else None, kube_version=f"v{KUBE_VERSION}")
    errors = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not report["errors"] and not errors, report


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_document_is_valid_kubernetes(which: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(which)
    assert len(docs) > 15
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_default_values_run_every_part_in_the_chart(default: list[Doc]) -> None:
    workloads = {(d["kind"], d["metadata"]["name"].removeprefix("mic-microscope-")) for d in default}
    for expected in [
        ("Deployment", "prefect-server"),
        ("StatefulSet", "postgres"),
        ("StatefulSet", "redis"),
        ("Deployment", "worker-gpu"),
        ("Deployment", "worker-cpu"),
        ("Deployment", "mlflow"),
        ("StatefulSet", "qdrant"),
        ("StatefulSet", "minio"),
        ("Job", "minio-bucket"),
        ("Deployment", "viewer"),
        ("Deployment", "webhook"),
        ("Job", "register"),
        ("Secret", "credentials"),
    ]:
        assert expected in workloads
    for kind in ("Deployment", "StatefulSet"):
        for d in of_kind(default, kind):
            assert d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
            assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("which", ["default", "production"])
def test_pods_have_resources_probes_and_run_unprivileged(which: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(which)
    for obj, spec in pod_specs(docs):
        where = f"{obj['kind']} {obj['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        for c in containers(spec):
            sc = c.get("securityContext", {})
            assert c["resources"]["requests"], f"{where}/{c['name']}: no resource requests"
            assert c["resources"]["limits"]["memory"], f"{where}/{c['name']}: no memory limit"
            assert pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot"), f"{where}/{c['name']} may run as root"
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert (sc.get("seccompProfile") or pod_sc["seccompProfile"])["type"] == "RuntimeDefault"
        if obj["kind"] != "Job" and not is_hook(obj):
            for c in spec["containers"]:
                assert "livenessProbe" in c and "readinessProbe" in c, f"{where}/{c['name']}: probes missing"
        assert isinstance(pod_sc.get("runAsUser"), int) and pod_sc["runAsUser"] > 0, where


def test_third_party_images_run_as_their_own_users(default: list[Doc]) -> None:
    uids = {
        obj["metadata"]["name"].removeprefix("mic-microscope-"): spec["securityContext"]["runAsUser"]
        for obj, spec in pod_specs(default)
    }
    assert uids["postgres"] == 999 and uids["redis"] == 999
    assert uids["qdrant"] == 1000 and uids["minio"] == 1000
    assert uids["prefect-server"] == uids["worker-gpu"] == uids["viewer"] == 10001


def test_services_probe_their_health_endpoints(default: list[Doc]) -> None:
    def probe_path(name: str, probe: str = "livenessProbe") -> str:
        (c,) = one(default, "Deployment", f"mic-microscope-{name}")["spec"]["template"]["spec"]["containers"]
        return c[probe]["httpGet"]["path"]

    assert probe_path("prefect-server") == probe_path("prefect-server", "readinessProbe") == "/api/health"
    assert probe_path("worker-gpu") == probe_path("worker-cpu") == "/health"
    assert probe_path("mlflow") == "/health"
    # the viewer's pod runs Streamlit and its oauth2-proxy; Streamlit listens on 127.0.0.1, which
    # kubelet's httpGet (aimed at the pod IP) cannot reach, so its health is asked from inside
    viewer = {
        c["name"]: c
        for c in one(default, "Deployment", "mic-microscope-viewer")["spec"]["template"]["spec"]["containers"]
    }
    assert set(viewer) == {"viewer", "oauth2-proxy"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "http://127.0.0.1:8501/_stcore/health" in viewer["viewer"][probe]["exec"]["command"][-1]
    assert viewer["oauth2-proxy"]["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert viewer["oauth2-proxy"]["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert probe_path("webhook") == "/healthz"
    (qdrant,) = one(default, "StatefulSet", "mic-microscope-qdrant")["spec"]["template"]["spec"]["containers"]
    assert qdrant["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert qdrant["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {p["containerPort"] for p in qdrant["ports"]} == {6333, 6334}


# ---- Prefect server and workers ---------------------------------------------------------------


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def test_prefect_server_uses_postgres_and_redis_messaging(default: list[Doc]) -> None:
    (server,) = one(default, "Deployment", "mic-microscope-prefect-server")["spec"]["template"]["spec"]["containers"]
    assert server["command"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    env = env_of(server)
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]["value"]
    assert url == "postgresql+asyncpg://$(DATABASE_USER):$(DATABASE_PASSWORD)@mic-microscope-postgres:5432/prefect"
    names = list(env)
    assert names.index("DATABASE_PASSWORD") < names.index("PREFECT_API_DATABASE_CONNECTION_URL")  # $(VAR) order
    assert env["DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mic-microscope-postgres",
        "key": "password",
    }
    assert (
        env["PREFECT_MESSAGING_BROKER"]["value"] == env["PREFECT_MESSAGING_CACHE"]["value"] == "prefect_redis.messaging"
    )
    assert env["PREFECT_REDIS_MESSAGING_HOST"]["value"] == "mic-microscope-redis"
    assert env["PREFECT_REDIS_MESSAGING_PORT"]["value"] == "6379"
    assert env["PREFECT_REDIS_MESSAGING_DB"]["value"] == "0"
    assert env["PREFECT_REDIS_MESSAGING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mic-microscope-redis"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"]["value"] == "false"
    # the default server image is ours (it has prefect-redis), not the official one
    assert server["image"] == "ghcr.io/microscope-ml/microscope:0.1.0-cpu"


def test_workers_poll_their_pools_with_a_healthcheck(default: list[Doc]) -> None:
    for pool in ("gpu", "cpu"):
        spec = one(default, "Deployment", f"mic-microscope-worker-{pool}")["spec"]["template"]["spec"]
        (worker,) = spec["containers"]
        cmd = worker["command"]
        assert cmd[:3] == ["prefect", "worker", "start"]
        assert cmd[cmd.index("--pool") + 1] == f"microscope-{pool}"
        assert cmd[cmd.index("--type") + 1] == "kubernetes"
        assert "--with-healthcheck" in cmd
        assert worker["image"] == "ghcr.io/microscope-ml/microscope:0.1.0-cpu"
        assert worker["livenessProbe"]["httpGet"]["port"] == "health"
        assert {"name": "health", "containerPort": 8080} in worker["ports"]
        env = env_of(worker)
        assert env["PREFECT_API_URL"]["value"] == "http://mic-microscope-prefect-server:4200/api"
        assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == NAMESPACE
        assert spec["serviceAccountName"] == "mic-microscope-worker"


def test_external_prefect_api_replaces_the_server() -> None:
    docs, notes = render(
        {
            "prefect": {
                "server": {"enabled": False},
                "externalApiUrl": "https://api.prefect.cloud/api/accounts/a/workspaces/w",
                "apiKey": {"existingSecret": "prefect-cloud"},
            }
        }
    )
    assert not [d for d in docs if d["metadata"]["name"].endswith("prefect-server")]
    (worker,) = one(docs, "Deployment", "mic-microscope-worker-gpu")["spec"]["template"]["spec"]["containers"]
    env = env_of(worker)
    assert env["PREFECT_API_URL"]["value"].startswith("https://api.prefect.cloud/")
    assert env["PREFECT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "prefect-cloud", "key": "PREFECT_API_KEY"}
    assert "export PREFECT_API_URL=https://api.prefect.cloud/" in notes


def test_worker_role_grants_exactly_what_a_kubernetes_worker_needs(default: list[Doc]) -> None:
    role = one(default, "Role", "mic-microscope-worker")
    rules = {(tuple(r["apiGroups"]), resource): set(r["verbs"]) for r in role["rules"] for resource in r["resources"]}
    assert rules == {
        (("batch",), "jobs"): {"create", "get", "list", "watch", "delete", "patch"},
        (("",), "pods"): {"get", "list", "watch"},
        (("",), "pods/log"): {"get", "list", "watch"},
        (("",), "events"): {"get", "list", "watch"},
    }
    binding = one(default, "RoleBinding", "mic-microscope-worker")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "mic-microscope-worker",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mic-microscope-worker", "namespace": NAMESPACE}]
    one(default, "ServiceAccount", "mic-microscope-worker")
    assert not of_kind(default, "ClusterRole") and not of_kind(default, "ClusterRoleBinding")


def test_audit_pods_have_their_own_service_account_without_rbac(default: list[Doc]) -> None:
    audit = one(default, "ServiceAccount", "microscope-audit")
    assert audit["automountServiceAccountToken"] is False
    bound = {s["name"] for b in of_kind(default, "RoleBinding") for s in b["subjects"]}
    assert "microscope-audit" not in bound
    gpu, cpu = pools(default)
    assert gpu["service_account_name"] == cpu["service_account_name"] == "microscope-audit"


# ---- secrets ----------------------------------------------------------------------------------


def secret_values(docs: list[Doc]) -> dict[tuple[str, str], str]:
    return {
        (d["metadata"]["name"], k): base64.b64decode(v).decode()
        for d in of_kind(docs, "Secret")
        for k, v in d.get("data", {}).items()
    }


@pytest.mark.parametrize("which", ["default", "production"])
def test_no_container_carries_a_literal_secret(which: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(which)
    generated = {v for (_, key), v in secret_values(docs).items() if not key.isupper() and len(v) >= 16}
    for obj, spec in pod_specs(docs):
        for c in containers(spec):
            where = f"{obj['metadata']['name']}/{c['name']}"
            for e in c.get("env", []):
                if "value" not in e:
                    continue
                value = str(e["value"])
                if SECRETISH.search(e["name"]):
                    # only a URL whose password is a $(VAR) reference to a secretKeyRef env
                    assert URL_PASSWORD.search(value), f"{where}: {e['name']} is a literal, not a secretKeyRef"
                for pw in URL_PASSWORD.findall(value):
                    assert re.fullmatch(r"\$\([A-Z_]+\)", pw), f"{where}: {e['name']} embeds a password"
                assert not any(g in value for g in generated), f"{where}: {e['name']} inlines a generated secret"
            assert not any(g in json.dumps(c.get("args", []) + c.get("command", [])) for g in generated)
    for cm in of_kind(docs, "ConfigMap"):
        text = json.dumps(cm["data"])
        assert not any(g in text for g in generated), f"ConfigMap {cm['metadata']['name']} holds a password"


def test_generated_passwords_are_shared_not_duplicated(default: list[Doc]) -> None:
    secrets = secret_values(default)
    creds = {k: v for (name, k), v in secrets.items() if name == "mic-microscope-credentials"}
    assert set(creds) == {
        "MICROSCOPE_STORE",
        "MICROSCOPE_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "MLFLOW_TRACKING_URI",
        "MICROSCOPE_QDRANT_URL",
        "MICROSCOPE_QDRANT_API_KEY",
        "MICROSCOPE_REDIS_URL",
        "MICROSCOPE_EXECUTION",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
    }
    assert creds["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "s3-bucket/microscope-results"  # saved by register.py
    assert creds["MICROSCOPE_STORE"] == "s3://microscope/audits"
    assert creds["MICROSCOPE_S3_ENDPOINT_URL"] == f"http://mic-microscope-minio.{NAMESPACE}.svc:9000"
    assert creds["MLFLOW_TRACKING_URI"] == "http://mic-microscope-mlflow:5000"
    assert creds["MICROSCOPE_QDRANT_URL"] == "http://mic-microscope-qdrant:6333"
    assert creds["MICROSCOPE_EXECUTION"] == "deployments"
    # the copies audit pods read are the very values the services were started with
    assert creds["AWS_ACCESS_KEY_ID"] == secrets[("mic-microscope-minio", "root-user")]
    assert creds["AWS_SECRET_ACCESS_KEY"] == secrets[("mic-microscope-minio", "root-password")]
    assert creds["MICROSCOPE_QDRANT_API_KEY"] == secrets[("mic-microscope-qdrant", "api-key")]
    redis_pw = secrets[("mic-microscope-redis", "redis-password")]
    assert creds["MICROSCOPE_REDIS_URL"] == f"redis://:{redis_pw}@mic-microscope-redis:6379/1"
    for (name, key), value in secrets.items():
        if name != "mic-microscope-credentials":
            assert len(value) >= 20, f"{name}/{key} is too short"
    kept = [s for s in of_kind(default, "Secret") if s["metadata"]["name"] != "mic-microscope-credentials"]
    assert all(s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for s in kept)


def test_consumers_reference_the_generated_secrets(default: list[Doc]) -> None:
    def refs(name: str, kind: str = "Deployment") -> dict[str, tuple[str, str]]:
        spec = one(default, kind, f"mic-microscope-{name}")["spec"]["template"]["spec"]
        return {
            e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for c in containers(spec)
            for e in c.get("env", [])
            if "valueFrom" in e
        }

    assert refs("postgres", "StatefulSet")["POSTGRES_PASSWORD"] == ("mic-microscope-postgres", "password")
    assert refs("minio", "StatefulSet")["MINIO_ROOT_PASSWORD"] == ("mic-microscope-minio", "root-password")
    assert refs("qdrant", "StatefulSet")["QDRANT__SERVICE__API_KEY"] == ("mic-microscope-qdrant", "api-key")
    assert refs("webhook")["MICROSCOPE_WEBHOOK_SECRET"] == ("mic-microscope-webhook", "webhook-secret")
    assert refs("mlflow")["AWS_SECRET_ACCESS_KEY"] == ("mic-microscope-minio", "root-password")
    for name in ("viewer", "webhook"):
        pod = one(default, "Deployment", f"mic-microscope-{name}")["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == name]  # the viewer's pod also runs oauth2-proxy
        assert c["envFrom"] == [{"secretRef": {"name": "mic-microscope-credentials"}}]


def test_production_renders_no_secrets_and_no_minio(production: list[Doc]) -> None:
    assert of_kind(production, "Secret") == []
    assert not [d for d in production if "minio" in d["metadata"]["name"]]
    assert not [d for d in production if d["metadata"]["name"] == "microscope-postgres" and d["kind"] != "Secret"]
    (server,) = one(production, "Deployment", "microscope-prefect-server")["spec"]["template"]["spec"]["containers"]
    env = env_of(server)
    assert env["DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "microscope-postgres", "key": "password"}
    assert (
        "@microscope.cluster-abc123.eu-west-1.rds.amazonaws.com:5432/prefect"
        in (env["PREFECT_API_DATABASE_CONNECTION_URL"]["value"])
    )
    (mlflow,) = one(production, "Deployment", "microscope-mlflow")["spec"]["template"]["spec"]["containers"]
    assert "s3://acme-microscope-artifacts/mlflow" in mlflow["command"]
    assert env_of(mlflow)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "microscope-credentials"
    gpu, cpu = pools(production)
    assert gpu["env_from_secret"] == cpu["env_from_secret"] == "microscope-credentials"


def test_the_pools_name_the_credentials_secret(default: list[Doc]) -> None:
    gpu, cpu = pools(default)
    assert gpu["env_from_secret"] == cpu["env_from_secret"] == "mic-microscope-credentials"
    one(default, "Secret", "mic-microscope-credentials")


def test_an_external_password_needs_an_existing_credentials_secret() -> None:
    with pytest.raises(helm.HelmRenderError, match="credentials.existingSecret is required"):
        render({"s3": {"external": {"bucket": "b", "existingSecret": "s3-keys"}}})
    with pytest.raises(helm.HelmRenderError, match="postgres.auth.existingSecret is required"):
        render({"postgres": {"enabled": False, "external": {"host": "db.example.com"}}})


def test_external_bucket_with_ambient_credentials_turns_minio_off() -> None:
    docs, _ = render({"s3": {"region": "eu-west-1", "external": {"bucket": "acme"}}})
    assert not [d for d in docs if "minio" in d["metadata"]["name"]]
    creds = {k: v for (name, k), v in secret_values(docs).items() if name == "mic-microscope-credentials"}
    assert creds["MICROSCOPE_STORE"] == "s3://acme/audits"
    assert creds["MICROSCOPE_S3_ENDPOINT_URL"] == ""
    assert "AWS_SECRET_ACCESS_KEY" not in creds  # IRSA / workload identity


# ---- GPU pool ---------------------------------------------------------------------------------

NVIDIA_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_gpu_pool_defaults_ask_for_a_gpu_and_tolerate_its_taint(default: list[Doc], production: list[Doc]) -> None:
    gpu, cpu = pools(default)
    assert gpu["gpu_count"] >= 1 and NVIDIA_TAINT in gpu["tolerations"]
    assert cpu["gpu_count"] == 0 and NVIDIA_TAINT not in cpu["tolerations"]
    assert gpu["image"] == "ghcr.io/microscope-ml/microscope:0.1.0-cuda"
    assert cpu["image"] == "ghcr.io/microscope-ml/microscope:0.1.0-cpu"
    assert gpu["namespace"] == cpu["namespace"] == NAMESPACE
    assert (
        set(gpu)
        == set(cpu)
        == {
            "gpu_count",
            "node_selector",
            "tolerations",
            "memory_request",
            "memory_limit",
            "ephemeral_storage_request",
            "ephemeral_storage_limit",
            "shm_size",
            "cpu_request",
            "service_account_name",
            "namespace",
            "image",
            "image_pull_policy",
            "env_from_secret",
        }
    )
    assert gpu["memory_request"] == "32Gi" and gpu["shm_size"] == "16Gi" and gpu["cpu_request"] == "4"

    gpu, cpu = pools(production)
    assert gpu["gpu_count"] >= 1 and NVIDIA_TAINT in gpu["tolerations"]
    assert gpu["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert cpu["gpu_count"] == 0 and cpu["node_selector"] == {}


def test_pool_overrides_fit_the_pool_templates(default: list[Doc], production: list[Doc]) -> None:
    """What register.py will do with them: every key a job variable, every value valid for it."""
    pool_templates = pytest.importorskip("deployments.pool_templates")
    for docs in (default, production):
        for kind, overrides in zip(("gpu", "cpu"), pools(docs), strict=True):
            template = pool_templates.load_template(kind, overrides)
            defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
            assert overrides.items() <= defaults.items()


def test_image_tags_follow_the_app_version_and_can_be_pinned() -> None:
    docs, _ = render({"image": {"tag": "1.2.3"}})
    gpu, cpu = pools(docs)
    assert (gpu["image"], cpu["image"]) == (
        "ghcr.io/microscope-ml/microscope:1.2.3-cuda",
        "ghcr.io/microscope-ml/microscope:1.2.3-cpu",
    )
    docs, _ = render({"image": {"gpuTag": "gpu-sha", "cpuTag": "cpu-sha"}})
    gpu, cpu = pools(docs)
    assert gpu["image"].endswith(":gpu-sha") and cpu["image"].endswith(":cpu-sha")


# ---- values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prefect": {"sever": {}}}, "additional properties 'sever' not allowed"),
        ({"pools": {"gpu": {"gpuCount": "one"}}}, "want integer"),
        ({"pools": {"gpu": {"gpuCount": 0}}}, "minimum"),
        ({"postgres": {"enabled": "yes"}}, "want boolean"),
        ({"register": {"gateNotifyBlock": "slack webhook"}}, "does not match pattern"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)
    report = helm.lint(CHART, values)
    assert any(message.split("'")[0] in e for e in report["errors"]), report


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_on_purpose = {"extraVariables", "affinity"}  # free-form by nature

    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                yield path
            for key, child in node.items():
                if path.rsplit("/", 1)[-1] in open_on_purpose:
                    continue
                yield from walk(child, f"{path}/{key}")

    assert list(walk(schema, "")) == []
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(production_values())


# ---- hooks ------------------------------------------------------------------------------------


def test_register_hook_job_registers_pools_and_deployments(default: list[Doc]) -> None:
    job = one(default, "Job", "mic-microscope-register")
    notes = job["metadata"]["annotations"]
    assert set(notes["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert set(notes["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    spec = job["spec"]["template"]["spec"]
    (register,) = spec["containers"]
    assert register["image"] == "ghcr.io/microscope-ml/microscope:0.1.0-cpu"
    assert register["workingDir"] == "/opt/microscope"
    cmd = register["command"]
    assert cmd[:2] == ["python", "deployments/register.py"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert flags == {
        "--gpu-image": "ghcr.io/microscope-ml/microscope:0.1.0-cuda",
        "--cpu-image": "ghcr.io/microscope-ml/microscope:0.1.0-cpu",
        "--namespace": NAMESPACE,
        "--service-account": "microscope-audit",
        "--credentials-secret": "mic-microscope-credentials",
        "--pool-overrides": "/etc/microscope/pools",
    }
    assert env_of(register)["PREFECT_API_URL"]["value"] == "http://mic-microscope-prefect-server:4200/api"
    assert register["envFrom"] == [{"secretRef": {"name": "mic-microscope-credentials"}}]
    (mount,) = [m for m in register["volumeMounts"] if m["mountPath"] == "/etc/microscope/pools"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "mic-microscope-pools"
    (wait,) = spec["initContainers"]
    assert "http://mic-microscope-prefect-server:4200/api/health" in wait["command"]


def test_gate_alerts_name_their_notification_block() -> None:
    docs, _ = render({"register": {"gateNotifyBlock": "slack-webhook/ml-team"}})
    (register,) = one(docs, "Job", "mic-microscope-register")["spec"]["template"]["spec"]["containers"]
    assert env_of(register)["MICROSCOPE_GATE_NOTIFY_BLOCK"]["value"] == "slack-webhook/ml-team"
    (register,) = one(render()[0], "Job", "mic-microscope-register")["spec"]["template"]["spec"]["containers"]
    assert "MICROSCOPE_GATE_NOTIFY_BLOCK" not in env_of(register)  # off unless a block is named


def test_minio_bucket_hook_creates_the_bucket(default: list[Doc]) -> None:
    job = one(default, "Job", "mic-microscope-minio-bucket")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    assert mc["image"].startswith("minio/mc:")
    assert env_of(mc)["BUCKET"]["value"] == "microscope"
    assert 'mc mb --ignore-existing "minio/$BUCKET"' in mc["command"][-1]


# ---- ingress and notes ------------------------------------------------------------------------


def test_production_exposes_every_ui_over_tls(production: list[Doc]) -> None:
    ingresses = {i["metadata"]["name"]: i for i in of_kind(production, "Ingress")}
    backends = {
        "microscope-viewer": ("microscope-viewer", 8501, "microscope.example.com"),
        "microscope-webhook": ("microscope-webhook", 8080, "microscope-webhook.example.com"),
        "microscope-prefect": ("microscope-prefect-server", 4200, "prefect.microscope.example.com"),
        "microscope-mlflow": ("microscope-mlflow", 5000, "mlflow.microscope.example.com"),
    }
    assert set(ingresses) == set(backends)
    for name, (service, port, host) in backends.items():
        spec = ingresses[name]["spec"]
        assert spec["ingressClassName"] == "nginx"
        assert spec["tls"] == [{"hosts": [host], "secretName": f"{name}-tls"}]
        (rule,) = spec["rules"]
        assert rule["host"] == host
        assert rule["http"]["paths"][0]["backend"]["service"] == {"name": service, "port": {"number": port}}
    assert "auth-url" in " ".join(ingresses["microscope-prefect"]["metadata"]["annotations"])
    (server,) = one(production, "Deployment", "microscope-prefect-server")["spec"]["template"]["spec"]["containers"]
    assert env_of(server)["PREFECT_UI_API_URL"]["value"] == "https://prefect.microscope.example.com/api"
    (mlflow,) = one(production, "Deployment", "microscope-mlflow")["spec"]["template"]["spec"]["containers"]
    assert "mlflow.microscope.example.com" in env_of(mlflow)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")


def test_default_has_no_ingress_and_notes_explain_port_forwarding(default: list[Doc]) -> None:
    assert of_kind(default, "Ingress") == []
    _, notes = render(WITH_UIS)
    for service, port in [("viewer", 8501), ("prefect-server", 4200), ("mlflow", 5000), ("webhook", 8080)]:
        assert f"port-forward svc/mic-microscope-{service} {port}:{port}" in notes
    assert "prefect deployment run audit/checkpoint -p model=" in notes
    _, notes = render(production_values(), name="microscope")
    assert "https://prefect.microscope.example.com/" in notes and "port-forward" not in notes


# ---- the viewer behind authentication ---------------------------------------------------------

OAUTH2_PROXY_IMAGE = re.compile(r"^quay\.io/oauth2-proxy/oauth2-proxy:v7\.\d+\.\d+$")


def assert_valid(docs: list[Doc]) -> None:
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def viewer_pod(docs: list[Doc], name: str = "mic-microscope-viewer") -> tuple[Doc, dict[str, Doc]]:
    """The viewer's pod spec and its containers by name."""
    spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
    return spec, {c["name"]: c for c in spec["containers"]}


def service_target(docs: list[Doc], name: str = "mic-microscope-viewer") -> tuple[str, int]:
    """(container, port) the viewer Service's `http` port reaches, resolved as kube-proxy does."""
    (port,) = one(docs, "Service", name)["spec"]["ports"]
    assert port["name"] == "http"
    _, by_name = viewer_pod(docs, name)
    (target,) = [
        (c, p["containerPort"])
        for c, spec in by_name.items()
        for p in spec.get("ports", [])
        if p["name"] == port["targetPort"]
    ]
    return target


def test_the_default_viewer_needs_oidc_values_or_says_how_to_opt_out() -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        render({"viewer": {"auth": {}}})  # the chart's defaults: mode oauth2-proxy, nothing else set
    message = str(raised.value)
    for value in ("viewer.auth.oidcIssuerUrl", "viewer.auth.clientId", "viewer.auth.existingSecret"):
        assert message.count(value) == 1, message
    assert message.count("viewer.auth.mode=none") == 1 and "without authentication" in message
    assert '"client-secret"' in message and '"cookie-secret"' in message
    # only what is missing is named
    with pytest.raises(helm.HelmRenderError, match="set viewer.auth.clientId \\(") as raised:
        render({"viewer": {"auth": {**OIDC, "clientId": ""}}})
    assert "oidcIssuerUrl" not in str(raised.value) and "existingSecret" not in str(raised.value)
    # no viewer, nothing to protect
    docs, _ = render({"viewer": {"enabled": False, "auth": {}}})
    assert "mic-microscope-viewer" not in {d["metadata"]["name"] for d in docs}


def test_the_viewer_sits_behind_an_oauth2_proxy_sidecar(default: list[Doc]) -> None:
    spec, by_name = viewer_pod(default)
    assert [c["name"] for c in spec["containers"]] == ["viewer", "oauth2-proxy"]
    viewer, proxy = by_name["viewer"], by_name["oauth2-proxy"]
    # Streamlit on the loopback only, with no port of its own: the proxy is the only way in
    assert viewer["command"] == ["microscope", "view", "--host", "127.0.0.1", "--port", "8501"]
    assert "ports" not in viewer
    assert service_target(default) == ("oauth2-proxy", 4180)
    assert one(default, "Service", "mic-microscope-viewer")["spec"]["ports"][0]["port"] == 8501
    assert OAUTH2_PROXY_IMAGE.match(proxy["image"]), proxy["image"]
    assert "command" not in proxy  # the image's entrypoint is the proxy
    args = proxy["args"]
    for arg in (
        "--provider=oidc",
        "--oidc-issuer-url=https://login.acme.example/realms/ml",
        "--client-id=microscope-viewer",
        "--upstream=http://127.0.0.1:8501",
        "--http-address=0.0.0.0:4180",
        "--reverse-proxy=true",
        "--email-domain=*",
    ):
        assert arg in args, args
    assert not [
        a for a in args if a.startswith(("--allowed-group", "--redirect-url", "--skip-auth", "--cookie-secure"))
    ]
    assert not [a for a in args if "secret" in a.lower()]  # secrets never on the command line
    # secrets by reference from the operator's Secret; the proxy sees nothing of the credentials
    assert "envFrom" not in proxy
    assert env_of(proxy) == {
        "OAUTH2_PROXY_CLIENT_SECRET": {
            "name": "OAUTH2_PROXY_CLIENT_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "mic-viewer-oidc", "key": "client-secret"}},
        },
        "OAUTH2_PROXY_COOKIE_SECRET": {
            "name": "OAUTH2_PROXY_COOKIE_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "mic-viewer-oidc", "key": "cookie-secret"}},
        },
    }
    assert not [s for s in of_kind(default, "Secret") if s["metadata"]["name"] == "mic-viewer-oidc"]
    # non-root under the chart's security contexts, read-only root filesystem
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert proxy["securityContext"] == {**viewer["securityContext"], "readOnlyRootFilesystem": True}
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]["memory"]
    assert_valid([d for d in default if d["metadata"]["name"] == "mic-microscope-viewer"])


def test_viewer_auth_values_reach_the_proxy() -> None:
    auth = {
        **OIDC,
        "clientSecretKey": "oidc-client-secret",
        "cookieSecretKey": "oidc-cookie-secret",
        "emailDomains": ["acme.example", "acme-labs.example"],
        "allowedGroups": ["ml-platform", "ml-admins"],
        "extraArgs": ["--scope=openid email profile groups"],
        "image": {"repository": "registry.example.com/oauth2-proxy", "tag": "v7.12.0", "pullPolicy": "Always"},
    }
    ingress = {
        "enabled": True,
        "className": "nginx",
        "tls": {"enabled": True},
        "viewer": {"host": "viewer.acme.example"},
    }
    docs, notes = render({"viewer": {"auth": auth}, "ingress": ingress})
    assert_valid(docs)
    _, by_name = viewer_pod(docs)
    proxy = by_name["oauth2-proxy"]
    assert proxy["image"] == "registry.example.com/oauth2-proxy:v7.12.0" and proxy["imagePullPolicy"] == "Always"
    args = proxy["args"]
    assert "--redirect-url=https://viewer.acme.example/oauth2/callback" in args
    assert [a for a in args if a.startswith("--email-domain=")] == [
        "--email-domain=acme.example",
        "--email-domain=acme-labs.example",
    ]
    assert [a for a in args if a.startswith("--allowed-group=")] == [
        "--allowed-group=ml-platform",
        "--allowed-group=ml-admins",
    ]
    assert args[-1] == "--scope=openid email profile groups"  # extra flags last: they win
    assert "--cookie-secure=false" not in args
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in proxy["env"]}
    assert refs["OAUTH2_PROXY_CLIENT_SECRET"] == {"name": "mic-viewer-oidc", "key": "oidc-client-secret"}
    assert refs["OAUTH2_PROXY_COOKIE_SECRET"] == {"name": "mic-viewer-oidc", "key": "oidc-cookie-secret"}
    # the Ingress still reaches the Service, whose http port is the proxy's
    (rule,) = one(docs, "Ingress", "mic-microscope-viewer")["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "mic-microscope-viewer", "port": {"number": 8501}}
    assert service_target(docs) == ("oauth2-proxy", 4180)
    assert "https://viewer.acme.example/oauth2/callback" in notes and "WITHOUT authentication" not in notes
    # an ingress without TLS: the redirect is http and the session cookie cannot be Secure
    docs, _ = render({"ingress": {"enabled": True}})
    args = viewer_pod(docs)[1]["oauth2-proxy"]["args"]
    assert "--redirect-url=http://viewer.microscope.local/oauth2/callback" in args and "--cookie-secure=false" in args


def test_production_viewer_signs_in_with_the_company_idp(production: list[Doc]) -> None:
    _, by_name = viewer_pod(production, "microscope-viewer")
    proxy = by_name["oauth2-proxy"]
    for arg in (
        "--oidc-issuer-url=https://login.acme.example/realms/ml",
        "--client-id=microscope-viewer",
        "--redirect-url=https://microscope.example.com/oauth2/callback",
        "--email-domain=acme.example",
        "--allowed-group=ml-platform",
    ):
        assert arg in proxy["args"], proxy["args"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in proxy["env"]} == {"microscope-viewer-oidc"}
    assert service_target(production, "microscope-viewer") == ("oauth2-proxy", 4180)
    assert "microscope-viewer-oidc" in PRODUCTION.read_text().split("helm upgrade")[0]  # listed with the other Secrets


def test_mode_none_serves_streamlit_directly_and_notes_warn() -> None:
    docs, notes = render({"viewer": {"auth": {"mode": "none"}}})
    assert_valid(docs)
    spec, by_name = viewer_pod(docs)
    (viewer,) = spec["containers"]
    assert viewer["command"] == ["microscope", "view", "--host", "0.0.0.0", "--port", "8501"]
    assert viewer["ports"] == [{"name": "http", "containerPort": 8501}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert viewer[probe]["httpGet"] == {"path": "/_stcore/health", "port": "http"}
    assert service_target(docs) == ("viewer", 8501)
    assert "WARNING: viewer.auth.mode=none" in notes and "WITHOUT authentication" in notes
    assert "oauth2-proxy with" not in notes
    # and the default's notes say where users sign in instead of warning
    _, notes = render()
    assert "WARNING" not in notes
    assert "oauth2-proxy with https://login.acme.example/realms/ml" in notes
    assert "http://localhost:8501/oauth2/callback" in notes  # through port-forward (no ingress)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({**OIDC, "clientSecret": "s3cr3t"}, "additional properties 'clientSecret' not allowed"),
        ({**OIDC, "mode": "basic"}, "value must be one of 'oauth2-proxy', 'none'"),
        ({**OIDC, "existingSecret": "Viewer_OIDC"}, "does not match pattern"),
        ({**OIDC, "emailDomains": []}, "minItems"),
        ({**OIDC, "extraArgs": ["scope=openid"]}, "does not match pattern"),
        (
            {**OIDC, "image": {"repository": "quay.io/oauth2-proxy/oauth2-proxy", "tag": "v7.12.0", "digest": "x"}},
            "additional properties 'digest' not allowed",
        ),
    ],
)
def test_schema_refuses_unknown_or_wrong_viewer_auth_values(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render({"viewer": {"auth": auth}})


@pytest.mark.parametrize("mode", ["oauth2-proxy", "none"])
def test_the_viewer_only_opens_the_release_store(mode: str, production: list[Doc]) -> None:
    docs, _ = render({"viewer": {"auth": {**OIDC, "mode": mode}}})
    _, by_name = viewer_pod(docs)
    stores = env_of(by_name["viewer"])["MICROSCOPE_VIEWER_STORES"]
    # the very MICROSCOPE_STORE the release hands audit pods, read from the credentials Secret
    assert stores["valueFrom"]["secretKeyRef"] == {"name": "mic-microscope-credentials", "key": "MICROSCOPE_STORE"}
    assert secret_values(docs)[("mic-microscope-credentials", "MICROSCOPE_STORE")] == "s3://microscope/audits"
    _, by_name = viewer_pod(production, "microscope-viewer")
    stores = env_of(by_name["viewer"])["MICROSCOPE_VIEWER_STORES"]
    assert stores["valueFrom"]["secretKeyRef"] == {"name": "microscope-credentials", "key": "MICROSCOPE_STORE"}
