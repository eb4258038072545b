"""Shared fixtures: tiny models built from configs, a small corpus, an isolated workspace, and real
local services (a Prefect server, moto_server as S3)."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 cores shared by several xdist workers and their subprocesses: one BLAS/OpenMP thread per
# process; more only spin against each other
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# AppTest runs the viewer's pages inside the test workers, where torch is imported already: the viewer's warm-up
# thread (dashboard/prewarm.py) would only hold pages back; tests/dashboard/test_prewarm.py tests it
os.environ.setdefault("MICROSCOPE_VIEWER_PREWARM", "false")

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# pytest-xdist: `make test` runs the suite on several workers; each has its own Redis databases
WORKER_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


# ---- parallel runs: which tests share a worker ----------------------------------------------------
# `make test` runs the suite on xdist workers, a module at a time (so module fixtures, such as a Prefect
# server on Postgres and `make deploy`, are built once); the modules that read the session's finished
# audits go to a worker in groups (SHARED_GROUPS), so those audits are made once per group: three groups
# so that no one worker carries them all (a copy of the audits costs less than one worker running every
# module). Groups start longest first (measured; the rest in collection order), so the workers finish
# together.
SHARED_GROUPS = {
    "finished": (  # the viewer's pages and the results readers: text and vision audits
        "tests/microscope/test_results.py",
        "tests/microscope/test_results_views.py",
        "tests/microscope/test_feature_matching.py",
        "tests/dashboard/test_app.py",
        "tests/schemas/test_details.py",
        "tests/microscope/test_lineage_finished.py",
        "tests/dashboard/test_viewer_states.py",
        "tests/dashboard/test_matrix_page.py",
        "tests/microscope/test_glossary.py",
        "tests/dashboard/test_overview_layers.py",
    ),
    "finished-text": (  # the text audits only: the browser, steering, SAE import, store management
        "tests/dashboard/test_browser.py",
        "tests/flows/test_steer_cli.py",
        "tests/dashboard/test_lab_page.py",
        "tests/flows/test_sae_import_e2e.py",
        "tests/microscope/test_store_admin.py",
        "tests/flows/test_store_cmd.py",
        "tests/dashboard/test_store_page.py",
    ),
    "finished-vision": (  # the vision audit only
        "tests/flows/test_robustness_e2e.py",
        "tests/flows/test_reliability_e2e.py",
    ),
}
SHARED_AUDITS = tuple(path for paths in SHARED_GROUPS.values() for path in paths)
_GROUP_OF = {path: group for group, paths in SHARED_GROUPS.items() for path in paths}
LONGEST_FIRST = [
    "finished",
    "finished-text",
    "finished-vision",
    "tests/deploy/test_deployments_e2e.py",
    "tests/flows/test_gates_e2e.py",
    "tests/flows/test_audit_core.py",
    "tests/flows/test_audit_e2e.py",
    "tests/deploy/test_webhook_trainers.py",
    "tests/deploy/test_webhook.py",
    "tests/flows/test_metrics_e2e.py",
    "tests/flows/test_sae_e2e.py",
    "tests/flows/test_production_config.py",
    "tests/flows/test_local_stack.py",
    "tests/flows/test_quantize_e2e.py",
]


def group_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return _GROUP_OF.get(path, path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(group_of(it.nodeid), len(rank)))  # stable: collection order within a group


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduler with our groups as its scopes (work units go out in collection order)."""
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return Groups(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:  # noqa: BLE001 -- not up yet
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


# ---- tiny models -------------------------------------------------------------------------------


def corpus_lines(n: int = 200) -> list[str]:
    import re
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(para.split())
            if len(text) > 40:
                out.append(text)
    return out[:n]


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style byte-level BPE tokenizer (vocab 512) trained on Python's help text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus_lines(400), vocab_size=512, special_tokens=["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def wordpiece_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT WordPiece tokenizer (vocab 512) trained on Python's help text."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    tok = BertWordPieceTokenizer()
    tok.train_from_iterator(corpus_lines(400), vocab_size=512)
    out = tmp_path_factory.mktemp("wordpiece")
    tok.save_model(str(out))
    # from the trained tokenizer itself: transformers 5 no longer reads `vocab_file` here (it built a
    # 5-token vocabulary that made every word [UNK])
    special = {f"{k}_token": f"[{k.upper()}]" for k in ("unk", "pad", "cls", "sep", "mask")}
    BertTokenizerFast(tokenizer_object=tok._tokenizer, **special).save_pretrained(out)
    return out


TINY_CONFIGS: dict[str, tuple[str, str, dict[str, object]]] = {
    # family: (config class, model class, config fields)
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_layer=3, n_embd=32, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}


def build_model(family: str, **overrides: object):
    """A tiny randomly initialised model of `family` (seeded, vocab 512), built from its config."""
    import torch
    import transformers as tf

    config_cls, model_cls, fields = TINY_CONFIGS[family]
    torch.manual_seed(0)
    cfg = getattr(tf, config_cls)(vocab_size=512, **{**fields, **overrides})
    return getattr(tf, model_cls)(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """An HF folder: tiny GPT-2 (safetensors) plus its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-gpt2")
    build_model("gpt2").save_pretrained(out)
    AutoTokenizer.from_pretrained(bpe_tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The digits CNN trained briefly (≥ 95% held out) as a safetensors state dict, and a .npz of the
    first 64 held-out test images."""
    import numpy as np
    from safetensors.torch import save_file

    from microscope.models.vision import digits_split, train_digits_cnn

    out = tmp_path_factory.mktemp("digits")
    model, acc = train_digits_cnn(epochs=10)
    assert acc >= 0.95, acc
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "digits_cnn.safetensors")
    _, _, xte, yte = digits_split()
    np.savez(out / "digits_test.npz", x=xte[:64], y=yte[:64])
    return out / "digits_cnn.safetensors", out / "digits_test.npz"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(corpus_lines(60)) + "\n")
    return p


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated MICROSCOPE_HOME (store, MLflow SQLite, Prefect results)."""
    h = tmp_path / "ms-home"
    monkeypatch.setenv("MICROSCOPE_HOME", str(h))
    monkeypatch.delenv("MICROSCOPE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return h


# ---- real local services -----------------------------------------------------------------------


@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None, **settings: str) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 (on `port`, or a free one) with `settings` as PREFECT_*
    variables; yields its API URL."""
    port = port or free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        **settings,
    }
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_http(f"{url}/health", 120, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server` on 127.0.0.1 (SQLite), shared by the CLI tests. Its loops for deployments and
    workers (scheduling, late runs, worker health, vacuum) are off: these tests start flows from the CLI, and
    one such server per xdist worker otherwise spends a tenth of a core polling. Events, task-run recording
    and automations (the gate alert) stay on."""
    idle = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CANCELLATION_CLEANUP")
    idle += ("DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER")
    off = {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in idle}
    with prefect_server(tmp_path_factory.mktemp("prefect-home"), **off) as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto_server on 127.0.0.1: a real S3 API for the store's boto3 path."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, 30, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MICROSCOPE_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1"
    ).create_bucket(Bucket=name)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "microscope"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


_WARM: dict[str, object] = {}


def warm_socket() -> str | None:
    """This worker's warm process (flows/preload.py), started at first use: `microscope run` forks from it
    instead of paying seven seconds of imports each time, as it does from `microscope up`'s on a laptop.
    tests/flows/test_warm_process.py holds it to the cold command's behaviour; tests that need a cold
    command (kill -9 of its process group) drop MICROSCOPE_WARM_SOCKET."""
    from flows import preload

    if not preload.supported():
        return None
    if "sock" not in _WARM:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="ms-warm-"))
        sock, log = root / "w.sock", open(root / "warm.log", "w")
        cmd = [sys.executable, "-m", "flows.preload", str(sock)]
        _WARM.update(sock=sock, log=log, proc=subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        while not sock.exists():
            if _WARM["proc"].poll() is not None or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise RuntimeError(f"the warm process did not start: {(root / 'warm.log').read_text()[-2000:]}")
            time.sleep(0.2)
    return str(_WARM["sock"])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if (proc := _WARM.get("proc")) is not None:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait(30)  # type: ignore[attr-defined]


def cli_env(tmp_path: Path, prefect_api: str | None, **extra: str) -> dict[str, str]:
    """Environment of a `microscope` subprocess: its own workspace, the given Prefect server (or none), this
    worker's warm process (`microscope run` forks from it)."""
    env = {
        **os.environ,
        "MICROSCOPE_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "ph"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    # PREFECT_LOGGING_SETTINGS_PATH and PYTHONWARNINGS: what an in-process `main()` (test_vectors) left in this
    # worker's environment; each command sets its own (quiet, or Prefect's console with -v)
    for k in (
        "MICROSCOPE_STORE",
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "PREFECT_LOGGING_SETTINGS_PATH",
        "PYTHONWARNINGS",
    ):
        env.pop(k, None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    if sock := warm_socket():
        env["MICROSCOPE_WARM_SOCKET"] = sock
    return {**env, **extra}


def audit_json(model: Path, dataset: Path, config_text: str, env: dict[str, str], cwd: Path) -> dict:
    """`microscope run --json` with `config_text` as the config; asserts success, returns the record."""
    import json

    config = cwd / "audit.yaml"
    config.write_text(config_text)
    args = ["run", "--model", str(model), "--dataset", str(dataset), "--config", str(config), "--json"]
    if "robustness:" not in config_text:  # AutoAttack is minutes of CPU: only where a test configures it
        args += ["--stages", "ingest,quantize,trace,sae,metrics,report"]
    p = run_cli(args, env, cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


# ---- the production configuration's services -----------------------------------------------------

PG = "127.0.0.1:5432"
REDIS = f"redis://127.0.0.1:6379/{8 + WORKER_INDEX}"  # Prefect's messaging: one database per xdist worker
REDIS_LOCKS = f"redis://127.0.0.1:6379/{WORKER_INDEX}"  # stage locks: one database per xdist worker


def reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


NEEDS_PG_REDIS = pytest.mark.skipif(
    not (reachable(5432) and reachable(6379)), reason="needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379"
)


@pytest.fixture(scope="module")
def databases() -> Iterator[list[str]]:
    """Two fresh PostgreSQL databases (Prefect, MLflow), dropped afterwards."""
    import psycopg2

    names = [f"microscope_{kind}_{secrets.token_hex(4)}" for kind in ("prefect", "mlflow")]
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for n in names:
            cur.execute(f"CREATE DATABASE {n}")
    yield names
    with conn.cursor() as cur:
        for n in names:
            cur.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
    conn.close()


@pytest.fixture(scope="module")
def prefect_on_postgres(databases: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on PostgreSQL with Redis messaging (the production configuration)."""
    with prefect_server(
        tmp_path_factory.mktemp("prefect-pg"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://postgres@{PG}/{databases[0]}",
        PREFECT_MESSAGING_BROKER="prefect_redis.messaging",
        PREFECT_MESSAGING_CACHE="prefect_redis.messaging",
        PREFECT_REDIS_MESSAGING_URL=REDIS,
    ) as url:
        yield url


def make_deploy(env: dict[str, str]) -> str:
    """`make deploy` with process pools (the stand-in for Kubernetes pods here); returns its output."""
    p = subprocess.run(
        ["make", "-s", "deploy", "DEPLOY_ARGS=--pool-type process"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: a Prefect worker may linger on its websocket for half a minute."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---- finished audits: what the results API and the viewer read -----------------------------------------

SMALL_AUDIT = """
dataset: {seq_len: 32, max_tokens: 2048}
quantize: {formats: [int8, magnitude-30, magnitude-50]}
trace: {layers: all, hooks: [resid], batch_size: 8, part_tokens: 512}
sae: {hooks: [blocks.1.hook_resid_post], expansion: 2, k: 4, batch_size: 128, epochs: 2, buffer_tokens: 1024}
metrics: {sensitivity_windows: 1, hutchinson_probes: 2, cka_tokens: 256}
landscape: {samples: 256, eigenvalues: 2, power_iters: 20, grid: 7}
attribution: {samples: 2, ig_steps: 16, layer_steps: 8}
"""
FINISHED_RUN = "run-finished"


@pytest.fixture(scope="session")
def finished_audits(
    tmp_path_factory: pytest.TempPathFactory, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path
) -> dict[str, dict]:
    """Real audits in one store, made once per session: steps 1 and 2 of training run FINISHED_RUN (every
    stage but robustness) and a partial audit (ingest, metrics) of another run; their records by name."""
    import json

    root = tmp_path_factory.mktemp("finished")
    (root / "audit.yaml").write_text(SMALL_AUDIT)
    env = cli_env(root, prefect_api)

    def audit(stages: str, *extra: str) -> dict:
        args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
        p = run_cli([*args, "--stages", stages, "--json", *extra], env, root)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)

    full = "ingest,quantize,trace,sae,metrics,landscape,attribution,report"
    return {
        "step1": audit(full, "--run-id", FINISHED_RUN, "--step", "1"),
        "step2": audit(full, "--run-id", FINISHED_RUN, "--step", "2"),
        "partial": audit("ingest,metrics", "--run-id", "other"),
    }


VISION_AUDIT = """
model:
  module: microscope.models.vision:DigitsCNN
quantize:
  formats: [torch-int8]
metrics:
  sensitivity_windows: 1
  hutchinson_probes: 4
robustness:
  samples: 32
  batch_size: 32
  norms: [Linf]
  eps: {Linf: 0.0627}
  sweep: [0.0, 0.0314, 0.1255, 0.251]
  pgd_steps: 10
reliability:
  smoothing: {sigmas: [0.25], samples: 16, n0: 20, n: 200}
landscape: {samples: 512, eigenvalues: 2, power_iters: 20, grid: 7}
attribution: {samples: 3, ig_steps: 32, smoothgrad_samples: 8, layer_steps: 8}
"""


@pytest.fixture(scope="session")
def vision_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finished-vision")


@pytest.fixture(scope="session")
def finished_vision(vision_root: Path, prefect_api: str, digits_cnn: tuple[Path, Path]) -> dict:
    """A real finished audit of the digits CNN with a quantized variant and robustness (standard AutoAttack
    on 32 images), in a workspace of its own (`vision_root`: home/ holds its store and MLflow); its record.
    Shared by the robustness stage's test and the viewer's."""
    return audit_json(digits_cnn[0], digits_cnn[1], VISION_AUDIT, cli_env(vision_root, prefect_api), vision_root)
