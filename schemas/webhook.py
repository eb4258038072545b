"""The "checkpoint ready" message a training job sends (webhook body, Prefect event payload, `microscope
notify`), and the receiver's answers. Its JSON Schema is published at schemas/json/checkpoint-ready.json
(and served by the receiver at GET /v1/schema)."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.config import STAGES

MAX_STEP = (1 << 63) - 1  # what a BIGINT column (Prefect's, PostgreSQL's) holds
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a checkpoint message is a few hundred bytes; anything near this is a mistake
EVENT = "microscope.checkpoint.ready"  # the Prefect event name the checkpoint deployment's trigger expects
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a config under examples/, not a path


class CheckpointReady(BaseModel):
    """A checkpoint a training job has just written, to be audited once."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="CheckpointReady")

    checkpoint: str = Field(
        min_length=1,
        max_length=2048,
        description="Where the checkpoint is: s3://bucket/path, or an absolute path the pods see; under one of the "
        "receiver's allowed roots (MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS).",
    )
    run_id: str = Field(min_length=1, max_length=256, description="The training run it belongs to.")
    step: int = Field(
        ge=0, le=MAX_STEP, strict=True, description='The training step it was saved at (an integer, not "7" or true).'
    )
    dataset: str | None = Field(
        None,
        max_length=2048,
        description="The dataset: a Hugging Face dataset name, or s3://… or an absolute path under the allowed roots "
        "(default: the config's).",
    )
    config: str | dict[str, Any] | None = Field(
        None,
        description="Audit config: a name under examples/, an absolute path under the allowed roots, or an inline mapping.",
    )
    stages: list[str] | None = Field(None, description="Stages to run (default: all), plus what they depend on.")
    tags: dict[str, str] = Field(default_factory=dict, description="Free-form labels kept on the audit record.")
    callback_url: str | None = Field(
        None, max_length=2048, description="Where to POST the result, signed the same way, when the audit ends."
    )

    @field_validator("checkpoint")
    @classmethod
    def _uri(cls, v: str) -> str:
        if v != v.strip() or any(ord(c) < 32 for c in v):
            raise ValueError("checkpoint must be a URI or path without whitespace at its ends or control characters")
        scheme = v.partition("://")[0].lower() if "://" in v else ""
        if scheme and scheme != "s3":
            raise ValueError(f"checkpoint scheme '{scheme}://' is not accepted; send s3://bucket/path or a path")
        if ".." in v.replace("\\", "/").split("/"):
            raise ValueError("checkpoint must not climb out of its folder ('..'); send the path it really has")
        return v

    @field_validator("run_id", "dataset")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must not hold control characters (NUL, newlines, ...)")
        return v

    @field_validator("tags")
    @classmethod
    def _printable_tags(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if any(ord(c) < 32 or ord(c) == 127 for c in k + val):
                raise ValueError(f"tag {k!r} must not hold control characters")
        return v

    @field_validator("config")
    @classmethod
    def _no_nul(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if any("\x00" in text for text in _strings(v)):  # PostgreSQL (Prefect's parameters) cannot store NUL
            raise ValueError("must not hold NUL characters, in keys or values")
        return v

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str] | None) -> list[str] | None:
        unknown = [s for s in v or [] if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        return v

    @field_validator("callback_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http:// or https:// URL")
        if v is not None and any(ord(c) < 33 or ord(c) == 127 for c in v):
            raise ValueError("callback_url must not hold spaces or control characters; percent-encode them")
        return v

    def outside_roots(self, roots: Sequence[str]) -> str | None:
        """Why a path this message names lies under none of `roots` (as `normalise_root` returns them), one line
        naming the field; None when every one is inside."""
        for field, value in self.paths():
            if why := _outside(value, roots):
                return f"{field}: {value[:200]!r} {why}"
        return None

    def paths(self) -> Iterator[tuple[str, str]]:
        """(field, value) of the paths the audit will open: the checkpoint; the dataset unless it is a Hugging
        Face dataset name; the config unless it is a mapping or a name under examples/."""
        yield "checkpoint", self.checkpoint
        if self.dataset is not None and not _hub_name(self.dataset):
            yield "dataset", self.dataset
        if isinstance(self.config, str) and not CONFIG_NAME.fullmatch(self.config):
            yield "config", self.config

    def idempotency_key(self) -> str:
        """Derived from the content: the same (run_id, step, checkpoint) is one audit, whichever delivery
        id, receiver replica or restart it comes through."""
        blob = json.dumps([self.run_id, self.step, self.checkpoint], separators=(",", ":")).encode()
        return "microscope-checkpoint-" + hashlib.sha256(blob).hexdigest()[:40]

    def event(self) -> dict[str, Any]:
        """Keyword arguments of `prefect.events.emit_event` for users already on Prefect: the deployment
        trigger of `audit/checkpoint` starts the same audit from it."""
        resource = {"prefect.resource.id": f"microscope.checkpoint.{self.run_id}.{self.step}"}
        return {"event": EVENT, "resource": resource, "payload": self.model_dump(mode="json")}

    def flow_parameters(self) -> dict[str, Any]:
        """The audit entry flow's parameters (flows/audit.py:audit)."""
        params: dict[str, Any] = {"model": self.checkpoint, "run_id": self.run_id, "step": self.step}
        params |= {"dataset": self.dataset, "config": self.config, "stages": self.stages}
        params |= {"tags": dict(self.tags), "callback_url": self.callback_url}
        return {k: v for k, v in params.items() if v is not None}


def normalise_root(root: str) -> str:
    """A root as paths are compared with it: `s3://bucket/prefix/` or `/absolute/path/`, ending in '/' so that
    /data does not admit /database; ValueError naming the root when it is neither."""
    if root.lower().startswith("s3://"):
        rest = root[5:].rstrip("/")
        return f"s3://{rest}/" if rest else "s3://"
    if root.startswith("/") and ".." not in root.split("/"):
        path = _normpath(root)
        return path if path == "/" else path + "/"
    raise ValueError(
        f"MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS entry {root!r} is neither s3://bucket[/prefix] nor an absolute path; "
        "list roots like 's3://ckpts/ /data/checkpoints/' separated by spaces"
    )


def _outside(value: str, roots: Sequence[str]) -> str | None:
    """Why `value` (a URI or path) is under none of the normalised `roots`; None when it is under one."""
    if ".." in value.replace("\\", "/").split("/"):
        return "climbs out of its folder ('..'); send the path it really has"
    if "://" in value:
        scheme, _, rest = value.partition("://")
        if scheme.lower() != "s3":
            return f"has the scheme '{scheme}://'; send s3://bucket/path or an absolute path"
        target = f"s3://{rest}"  # S3 keys are literal: no normalising beyond the scheme's case
    elif value.startswith("/"):
        target = _normpath(value)
    else:
        return f"is not absolute; send an absolute path or an s3:// URI under the allowed roots ({', '.join(roots)})"
    if any((target.rstrip("/") + "/").startswith(root) for root in roots):
        return None
    return (
        f"is outside the allowed roots ({', '.join(roots)}); send one under them, or add its root to "
        "MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS on the receiver"
    )


def _normpath(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading '//'; one root is enough


def _hub_name(value: str) -> bool:
    """A Hugging Face dataset name (`wikitext`, `org/name`) rather than a path: relative, no scheme, no '~' or '..'."""
    climbs = ".." in value.replace("\\", "/").split("/")
    return not climbs and "://" not in value and not value.startswith(("/", "~", ".", "\\"))


def _strings(v: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, item in v.items():
            yield str(k)
            yield from _strings(item)
    elif isinstance(v, list):
        for item in v:
            yield from _strings(item)


class Accepted(BaseModel):
    flow_run_id: str
    deployment: str
    duplicate: bool = Field(description="True when this delivery found the flow run an earlier one created.")


class AuditStatus(BaseModel):
    flow_run_id: str
    state: str = Field(description="The flow run's state type: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, ...")
    audit_id: str | None = None
    status: str | None = Field(None, description="The audit's status once finished: completed, partial, failed.")
    report: str | None = None
    figures: dict[str, Any] = Field(default_factory=dict, description="Headline figures of the finished audit.")
    gate: dict[str, Any] | None = Field(None, description="The gate's verdict when the audit had rules (gate.rules).")
    error: str | None = None
