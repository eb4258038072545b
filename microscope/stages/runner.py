"""The one stage runner: what every stage does around its computation, in this order.

    content key → already finished? → lock → finished now? (another run did it) → clean orphans
    → compute (each file written under a temp name, then renamed / its multipart upload completed)
    → sha256 of every artifact → manifest last → record

A stage's unit of publication is the file, not the prefix: trace parts and robustness' AutoAttack
results are published one by one so a killed run resumes from them, and S3 has no prefix rename.
What makes a prefix *finished* is its manifest, written last, listing every artifact with its size
and sha256; a read verifies them, so a corrupted or truncated artifact is recomputed (with a warning
naming the file), never used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from schemas.details import StageDetails
from schemas.records import StageRecord, StageStatus

from microscope.errors import StorageError, describe_os_error, out_of_space
from microscope.store import MANIFEST, ArtifactStore

if TYPE_CHECKING:
    from microscope.stages.inputs import StageInputs

log = logging.getLogger("microscope.stages")


def stage_prefix(model_digest: str, stage: str, config_hash: str) -> str:
    return f"{model_digest[:16]}/{stage}/{config_hash}"


@dataclass
class StageRun:
    """Handed to a stage's compute function: where to write, and the record's common fields."""

    store: ArtifactStore
    stage: str
    prefix: str
    config_hash: str
    variant: str | None = None
    times: dict[str, Any] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def record(
        self,
        *,
        metrics: dict[str, float] | None = None,
        details: StageDetails | None = None,
        artifacts: dict[str, str] | None = None,
        input_digests: dict[str, str] | None = None,
        undefined: dict[str, str] | None = None,
    ) -> StageRecord:
        return StageRecord(
            stage=self.stage,
            variant=self.variant,
            status=StageStatus.completed,
            config_hash=self.config_hash,
            input_digests=input_digests or {},
            artifacts={**(artifacts or {}), "manifest": self.store.uri_for(self.key(MANIFEST))},
            metrics=metrics or {},
            undefined=undefined or {},
            details=(details or StageDetails(prefix=self.prefix)).model_dump(mode="json"),
        )


def finished(store: ArtifactStore, prefix: str, repair: bool = False) -> StageRecord | None:
    """The cached record when `prefix` holds a finished stage whose artifacts are all intact. With
    `repair` (only under the stage lock), a damaged stage loses its manifest and damaged files, so
    the recomputation (and a resuming trace) starts from what is sound."""
    manifest = store.read_manifest(prefix)
    if manifest is None:
        return None
    bad = _damaged(store, prefix, manifest.get("checksums"))
    if bad:
        for key, why in bad:
            log.warning("%s: artifact %s is %s; recomputing the stage", prefix, store.uri_for(key), why)
        if repair:
            for key, _ in bad:
                store.delete(key)
            store.delete(f"{prefix}/{MANIFEST}")
        return None
    rec = StageRecord.model_validate(manifest["record"])
    return rec.model_copy(update={"status": StageStatus.cached})


def _damaged(store: ArtifactStore, prefix: str, checksums: dict[str, dict[str, Any]] | None) -> list[tuple[str, str]]:
    if checksums is None:
        return [(f"{prefix}/{MANIFEST}", "from a version without checksums")]
    bad = []
    for key, want in sorted(checksums.items()):
        size = store.size(key)
        if size is None:
            bad.append((key, "missing"))
        elif size != want["bytes"]:
            bad.append((key, f"truncated or changed ({size:,} bytes, the manifest says {want['bytes']:,})"))
        elif store.verifies_content and store.sha256(key) != want["sha256"]:
            bad.append((key, "corrupted (its sha256 differs from the manifest's)"))
    return bad


def publish(store: ArtifactStore, prefix: str, record: StageRecord) -> StageRecord:
    """Checksum every artifact under `prefix`, then write the manifest: from now on it is finished."""
    checksums = {
        key: {"bytes": store.size(key), "sha256": store.sha256(key)}
        for key in store.list(prefix)
        if key != f"{prefix}/{MANIFEST}"
    }
    store.write_manifest(prefix, {"record": record.model_dump(mode="json"), "checksums": checksums})
    return record


@contextmanager
def stage_lock(store: ArtifactStore, name: str) -> Iterator[None]:
    """Held while a stage computes `name`: a file lock beside a local store (the OS drops it when the
    holder dies), a Redis lock with a renewed lease when MICROSCOPE_REDIS_URL is set (pods)."""
    from microscope.locks import stage_lock as lock

    s = store.settings
    with lock(
        f"{store.uri}|{name}",
        lock_dir=s.lock_dir,
        redis_url=s.redis_url,
        lease_s=s.lock_lease_s,
        on_wait=lambda msg: log.info("%s: waiting for another run computing it (%s)", name, msg),
    ):
        yield


@contextmanager
def timed(record: dict[str, Any]) -> Iterator[None]:
    record["started_at"] = datetime.now(UTC)
    t0 = time.perf_counter()
    yield
    record["seconds"] = time.perf_counter() - t0
    record["finished_at"] = datetime.now(UTC)


def run_stage(
    store: ArtifactStore,
    stage: str,
    prefix: str,
    config_hash: str,
    compute: Callable[[StageRun], StageRecord],
    variant: str | None = None,
) -> StageRecord:
    """Return the finished record at `prefix`, computing it (once, across concurrent runs) if needed."""
    done = finished(store, prefix)
    if done is not None:
        return done

    def compute_one(_: list[str]) -> dict[str, StageRecord]:
        run = StageRun(store, stage, prefix, config_hash, variant)
        with timed(run.times):
            record = compute(run)
        record = record.model_copy(update=run.times)
        return {prefix: publish(store, prefix, record)}

    return compute_unfinished(store, prefix, [prefix], compute_one)[prefix]


def compute_unfinished(
    store: ArtifactStore,
    lock: str,
    prefixes: list[str],
    compute: Callable[[list[str]], dict[str, StageRecord]],
) -> dict[str, StageRecord]:
    """The runner's steps after its first look, for one prefix or several computed together (one SAE fit
    trains the SAEs of several hooks): under `lock`, each prefix another run finished while we waited
    is read back (a damaged one repaired), the others' orphans are cleaned, then `compute` gets those
    left and returns their published records (a failure cleaned up as `cleaned_after_failure` says).
    Records keyed by prefix: those found finished first."""
    done: dict[str, StageRecord] = {}
    with stage_lock(store, lock):
        todo = []
        for prefix in prefixes:
            other = finished(store, prefix, repair=True)  # another run finished it while we waited
            if other is not None:
                done[prefix] = other
            else:
                store.clean_orphans(prefix)
                todo.append(prefix)
        if todo:
            with cleaned_after_failure(store, todo):
                done |= compute(todo)
    return done


@contextmanager
def cleaned_after_failure(store: ArtifactStore, prefixes: list[str]) -> Iterator[None]:
    """What a failed computation of `prefixes` leaves behind: out of space, nothing (what it wrote can never
    be finished here: the room goes to the audit record, and the error says so in one line); otherwise its
    finished parts stay (a re-run resumes from them) and its half-written files go."""
    try:
        yield
    except BaseException as exc:
        if out_of_space(exc):
            unfinished = [p for p in prefixes if store.read_manifest(p) is None]  # an SAE of a joint fit may be out
            for prefix in unfinished:
                store.delete_prefix(prefix)
            where = store.uri_for((unfinished or prefixes)[0])
            raise StorageError(describe_os_error(exc, where=where)) from exc  # type: ignore[arg-type]
        for prefix in prefixes:
            store.clean_orphans(prefix, why="half-written by this failed run")
        raise


def run_for_variant(
    inp: StageInputs, stage: str, chash: str, compute: Callable[[StageRun], StageRecord], variant: str
) -> StageRecord:
    """`run_stage` for a stage run on full precision ("fp", recorded without a variant) or on one variant."""
    prefix = stage_prefix(inp.model_digest, stage, chash)
    return run_stage(inp.store, stage, prefix, chash, compute, variant=None if variant == "fp" else variant)
