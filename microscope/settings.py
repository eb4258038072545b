"""Where Microscope keeps things and which services it talks to: one settings object, read from the
environment by pydantic-settings. Nothing else in the code reads `os.environ`.

Embedded defaults need nothing: a workspace folder (`./.microscope`) holds the artifact store, MLflow's
SQLite database, Qdrant's local index and the lock files. Production sets URLs instead.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MICROSCOPE_", extra="ignore", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path.cwd() / ".microscope",
        description="Workspace folder for the embedded defaults ($MICROSCOPE_HOME).",
    )
    store: str | None = Field(
        None, description="Artifact store: a folder or s3://bucket/prefix (default: home/artifacts)."
    )
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MICROSCOPE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, moto_server); default AWS.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MICROSCOPE_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI (default: SQLite in home).",
    )
    mlflow_artifacts: str | None = Field(None, description="MLflow artifact root (default: home/mlartifacts).")
    experiment: str = Field("microscope", description="MLflow experiment of the audits.")
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "microscope",
        description="Per-user cache shared by workspaces (an empty, migrated MLflow database to start new ones from).",
    )
    qdrant_url: str | None = Field(
        None, validation_alias=AliasChoices("MICROSCOPE_QDRANT_URL", "QDRANT_URL"), description="Qdrant server URL."
    )
    qdrant_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("MICROSCOPE_QDRANT_API_KEY", "QDRANT_API_KEY")
    )
    qdrant_path: Path | None = Field(None, description="Qdrant local-mode folder (default: home/qdrant).")
    redis_url: str | None = Field(
        None, description="Redis for stage locks shared across machines (default: file locks in the local store)."
    )
    lock_lease_s: float = Field(120.0, gt=0, description="A dead lock holder blocks others at most this long (Redis).")
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda | cuda:N.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")
    execution: Literal["local", "deployments"] = Field(
        "local",
        description="local: every stage in the audit's process; deployments: each stage a flow run of its "
        "stage deployment (GPU or CPU work pool), started by the audit flow.",
    )
    stage_flow: str = Field("stage", description="Flow name of the stage deployments (`<stage_flow>/<stage>`).")
    stage_start_timeout_s: float = Field(
        900.0,
        gt=0,
        description="execution=deployments: a stage flow run that no worker has started after this long is "
        "set Failed and the stage fails, naming the work pool that has no worker (instead of waiting Late forever).",
    )
    warm_socket: Path | None = Field(
        None,
        description="A warm process's socket (`python -m flows.preload SOCKET`) that `microscope run` runs in; "
        "default: the one `microscope up` keeps for this workspace, if it is up.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks secret(s) `whsec_…`, separated by spaces: the receiver accepts any (so a "
        "secret rotates without downtime); senders and result callbacks sign with the first.",
    )
    webhook_url: str | None = Field(
        None, description="Where senders (callbacks, `microscope notify`) POST checkpoints."
    )
    audit_deployment: str = Field("audit/checkpoint", description="The deployment a received checkpoint starts.")
    webhook_checkpoint_roots: Annotated[tuple[str, ...], NoDecode] = Field(
        ("s3://",),
        description="Where the receiver takes checkpoints (and dataset and config paths) from: s3://bucket/prefix "
        "and absolute-path prefixes, separated by spaces; anything else is refused with 422. Default: any s3:// "
        "URI and no local path. Empty: the receiver refuses to start (it would refuse every checkpoint).",
    )
    viewer_stores: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="The stores the viewer may open, separated by spaces (a deployment sets its own store): the "
        "Store box refuses any other. Empty: any store this process can read (a laptop).",
    )
    viewer_prewarm: bool = Field(
        True,
        description="The viewer imports torch and transformers in the background once its first page has rendered "
        "(4–5 s of CPU), so the Feature lab's first open does not pay for them. Off: each page imports what it needs.",
    )
    callback_allow_private: bool = Field(
        False,
        description="Let result callbacks go to loopback, private, link-local and other non-public addresses (a "
        "laptop, a test). Off: the receiver refuses such a callback_url with 422 and the audit refuses to POST there.",
    )
    webhook_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's headers, and again its body: a slower one gets 408 "
        "and the connection is closed (against slowloris clients holding connections open).",
    )
    gate_notify_block: str | None = Field(
        None,
        description="The Prefect notification block (`<block type>/<name>`, e.g. slack-webhook/ml-team) that the "
        "automation `make deploy` registers sends a message with when a gate fails.",
    )
    watch_prefix: str = Field(
        "s3://checkpoints",
        description="Prefix the checkpoint-watching deployment polls for new checkpoints: the default of "
        "`deployments/register.py --watch-prefix` (chart: register.watchPrefix).",
    )
    prefect_api_url: str | None = Field(
        None,
        validation_alias=AliasChoices("PREFECT_API_URL"),
        description="The Prefect server's API ($PREFECT_API_URL, Prefect's own name): what `deployments/register.py` "
        "registers with, and the viewer's link to a flow run when PREFECT_UI_URL is not set (without its /api).",
    )
    prefect_ui_url: str | None = Field(
        None,
        validation_alias=AliasChoices("PREFECT_UI_URL"),
        description="The Prefect UI ($PREFECT_UI_URL, Prefect's own name) the viewer links flow runs to.",
    )

    def webhook_secrets(self) -> list[str]:
        return self.webhook_secret.get_secret_value().split() if self.webhook_secret else []

    @field_validator("webhook_checkpoint_roots", "viewer_stores", mode="before")
    @classmethod
    def _split_roots(cls, v: Any) -> Any:
        return tuple(v.split()) if isinstance(v, str) else v  # the environment's form: separated by spaces

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and v != "cpu" and not v.startswith("cuda"):
            raise ValueError(f"MICROSCOPE_DEVICE={v!r} is not a device; use auto, cpu, cuda or cuda:N")
        return v

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def store_uri(self) -> str:
        return self.store or str(self.home_dir / "artifacts")

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> str:
        return self.mlflow_artifacts or (self.home_dir / "mlartifacts").as_uri()

    @property
    def qdrant_dir(self) -> Path:
        return self.qdrant_path or self.home_dir / "qdrant"

    @property
    def lock_dir(self) -> Path:
        return self.home_dir / "locks"

    def staging_dir(self) -> Path:
        """Local scratch for files on their way to a remote store."""
        p = self.home_dir / "staging"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def torch_device(self) -> str:
        """The device models run on: `auto` picks CUDA when a GPU is visible."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def get_settings() -> Settings:
    """The settings as the environment says now (cheap; tests change the environment between calls)."""
    return _cached(_env_key())


def _env_key() -> tuple[tuple[str, str], ...]:
    import os

    names = ("MICROSCOPE_", "MLFLOW_TRACKING_URI", "QDRANT_", "AWS_ENDPOINT_URL", "PREFECT_API_URL", "PREFECT_UI_URL")
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(names)))
    return (("cwd", os.getcwd()), *env)  # the default home is relative to the working directory


@lru_cache(maxsize=8)
def _cached(_key: tuple[tuple[str, str], ...]) -> Settings:
    return Settings()
