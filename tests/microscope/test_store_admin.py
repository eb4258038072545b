"""`microscope.store_admin` on real stores: the session's finished tiny-GPT-2 audits (read in place for
usage, copied before anything is deleted) and the same files in moto_server as S3. Every byte figure is
checked exactly (tolerance 0 bytes) against sizes summed independently with `os.walk`, and which prefixes an
audit uses against a regular expression over its record's JSON text (the module walks the parsed record)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from microscope import audits, results, store_admin
from microscope.errors import InputError
from microscope.stages.runner import finished, stage_lock
from microscope.store import TMP_MARK, ArtifactStore, open_store
from schemas.records import AuditRecord, StageRecord, StageStatus
from tests.conftest import make_bucket

# ---- independent references --------------------------------------------------------------------


def walk_sizes(root: Path, temps: bool = True) -> dict[str, int]:
    """Every file under `root` and its size, by os.walk (temp files only with `temps`)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if temps or TMP_MARK not in name:
                p = Path(folder, name)
                out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def under(sizes: dict[str, int], prefix: str) -> int:
    return sum(n for k, n in sizes.items() if k.startswith(prefix + "/"))


PREFIX = re.compile(r"\b([0-9a-f]{16}/[A-Za-z0-9_.-]+/[0-9a-f]{8,})(?=/|\")")


def record_prefixes(root: Path) -> dict[str, set[str]]:
    """Audit id -> the stage prefixes (`digest/stage/hash`) its record's text names anywhere (artifact URIs,
    `details.prefix`, the metrics stage's weight shards), found by a regular expression over the JSON text
    and kept where the folder exists."""
    out = {}
    for path in sorted((root / "audits").glob("*.json")):
        text = path.read_text()
        found = {p for p in PREFIX.findall(text) if (root / p).is_dir()}
        out[json.loads(text)["audit_id"]] = found
    return out


def own_units(sizes: dict[str, int], audit_id: str) -> int:
    """The record, logs and patches of an audit."""
    return (
        sizes.get(f"audits/{audit_id}.json", 0)
        + under(sizes, f"audits/{audit_id}")
        + under(sizes, f"patches/{audit_id}")
    )


def all_load(store: ArtifactStore, root: Path) -> None:
    """Every remaining record loads through microscope.results, its layer table and SAE features read, and
    every prefix it names still holds a finished stage whose files match the manifest's sizes and sha256."""
    for audit_id, prefixes in record_prefixes(root).items():
        rec = results.load_audit(store, audit_id)
        assert len(results.layer_table(store, rec)) > 0
        for hook in rec.saes:
            assert len(results.features(store, rec, hook)) > 0
        for p in prefixes:
            if store.exists(f"{p}/manifest.json"):
                assert finished(store, p) is not None, p


@pytest.fixture
def copy(tmp_path: Path, home: Path, finished_audits: dict[str, dict]) -> Path:
    """A private copy of the session's store: deletions here leave the shared one alone."""
    dst = tmp_path / "store"
    shutil.copytree(finished_audits["step1"]["store_uri"], dst)
    return dst


def plant(root: Path, key: str, size: int, age_s: float = 0.0) -> int:
    p = root / key
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(size))
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return size


def model_dir(finished_audits: dict[str, dict]) -> str:
    return finished_audits["step1"]["model_digest"][:16]


# ---- tests --------------------------------------------------------------------------------------


def test_usage_counts_every_byte_once(finished_audits: dict[str, dict], home: Path) -> None:
    root = Path(finished_audits["step1"]["store_uri"])
    store = open_store(str(root))
    sizes = walk_sizes(root, temps=False)
    refs = record_prefixes(root)
    u = store_admin.usage(store)

    assert store_admin.references(store) == {a: sorted(p) for a, p in refs.items()}
    assert u.total_bytes == sum(sizes.values())
    assert {a.audit_id for a in u.audits} == set(refs) == {r["audit_id"] for r in finished_audits.values()}
    for a in u.audits:
        others = set().union(*(p for b, p in refs.items() if b != a.audit_id))
        alone = refs[a.audit_id] - others
        shared = refs[a.audit_id] & others
        assert a.own_bytes == own_units(sizes, a.audit_id) + sum(under(sizes, p) for p in alone)
        assert a.shared_bytes == sum(under(sizes, p) for p in shared)
        assert set(a.shared_with) == {b for b, p in refs.items() if b != a.audit_id and p & shared}
    # steps 1 and 2 are the same checkpoint, data and config: their stages are one set of prefixes, shared
    s1, s2 = finished_audits["step1"]["audit_id"], finished_audits["step2"]["audit_id"]
    by_id = {a.audit_id: a for a in u.audits}
    assert s2 in by_id[s1].shared_with and by_id[s1].shared_bytes > 0

    (m,) = u.models
    assert m.model == model_dir(finished_audits)
    assert m.bytes == under(sizes, m.model) + sum(own_units(sizes, a) for a in refs)
    named = set().union(*refs.values())
    assert m.unreferenced_bytes == sum(
        n for k, n in sizes.items() if k.startswith(m.model + "/") and "/".join(k.split("/")[:3]) not in named
    )
    # each shared prefix once: the model's space is its audits' own, the shared once, and the unreferenced
    shared_once = {p for p in named if sum(p in r for r in refs.values()) > 1}
    assert (
        m.bytes == sum(a.own_bytes for a in u.audits) + sum(under(sizes, p) for p in shared_once) + m.unreferenced_bytes
    )
    assert u.other_bytes == u.total_bytes - m.bytes
    assert store_admin.human_bytes(3 * 2**20 + 2**19) == "3.5 MiB" and store_admin.human_bytes(2**31) == "2 GiB"


def test_delete_audit_frees_what_only_it_uses(copy: Path, finished_audits: dict[str, dict]) -> None:
    store = open_store(str(copy))
    refs = record_prefixes(copy)
    sizes = walk_sizes(copy)
    gone = finished_audits["partial"]["audit_id"]
    others = set().union(*(p for b, p in refs.items() if b != gone))
    alone = refs[gone] - others
    expected = own_units(sizes, gone) + sum(under(sizes, p) for p in alone)

    plan = store_admin.plan_delete_audit(store, gone[:-2])  # a unique prefix of the id is enough
    assert plan.bytes == expected
    assert set(plan.kept) == refs[gone] & others
    assert store.exists(f"audits/{gone}.json")  # a plan deletes nothing
    freed = store_admin.execute(plan)
    after = walk_sizes(copy)
    assert freed == expected == sum(sizes.values()) - sum(after.values())
    assert not store.exists(f"audits/{gone}.json")
    assert all(under(after, p) == under(sizes, p) for p in others)
    all_load(store, copy)


def test_delete_model_is_refused_while_an_audit_references_it(finished_audits: dict[str, dict], home: Path) -> None:
    store = open_store(finished_audits["step1"]["store_uri"])
    with pytest.raises(InputError) as err:
        store_admin.plan_delete_model(store, finished_audits["step1"]["model_digest"])
    msg = str(err.value)
    first = min(finished_audits.values(), key=lambda r: r["created_at"])["audit_id"]
    assert "\n" not in msg and f"audit {first} references" in msg and f"microscope delete {first}" in msg
    with pytest.raises(InputError, match="no model 'ffff' in"):
        store_admin.plan_delete_model(store, "ffff")
    with pytest.raises(InputError, match="no audit 'nope' in"):
        store_admin.plan_delete_audit(store, "nope")


def _lonely(store: ArtifactStore, finished_audits: dict[str, dict], audit_id: str, prefix: str) -> None:
    """A record of its own naming only `prefix` (its metrics stage), as an audit whose results nobody shares."""
    rec = AuditRecord.model_validate(finished_audits["partial"])
    stage = StageRecord(
        stage="metrics",
        status=StageStatus.completed,
        details={"prefix": prefix},
        artifacts={"rows": store.uri_for(f"{prefix}/rows.parquet")},
    )
    audits.save(
        store, rec.model_copy(update={"audit_id": audit_id, "stages": {"metrics": stage}, "variants": {}, "saes": {}})
    )


def test_a_running_audit_or_a_held_lock_refuses(copy: Path, finished_audits: dict[str, dict]) -> None:
    store = open_store(str(copy))
    m = model_dir(finished_audits)
    prefix = f"{m}/metrics/0123456789abcdef"
    n = plant(copy, f"{prefix}/rows.parquet", 4096)
    _lonely(store, finished_audits, "lonely", prefix)
    record = (copy / "audits" / "lonely.json").stat().st_size

    # a held stage lock: the prefix is being computed
    with stage_lock(store, prefix):
        with pytest.raises(
            InputError,
            match=rf"cannot delete audit lonely: {prefix} is being computed \(its stage lock is held by pid {os.getpid()}",
        ):
            store_admin.plan_delete_audit(store, "lonely")
    assert store_admin.plan_delete_audit(store, "lonely").bytes == n + record

    # an audit in flight (its marker, no record yet): nothing may go, gc included
    started = AuditRecord.model_validate(finished_audits["step1"]).model_copy(
        update={"audit_id": "still-running", "created_at": datetime.now(UTC)}
    )
    orphan = plant(copy, f"{m}/trace/feedfacefeedface/part-00000.parquet", 1000)
    gc = store_admin.plan_gc(store)  # made before the audit started
    audits.mark_started(store, started)
    with pytest.raises(InputError, match="audit still-running is running"):
        store_admin.execute(gc)  # it may have found the orphan cached since: nothing goes
    assert orphan and (copy / f"{m}/trace/feedfacefeedface/part-00000.parquet").exists()
    for plan in (lambda: store_admin.plan_delete_audit(store, "lonely"), lambda: store_admin.plan_gc(store)):
        with pytest.raises(InputError, match=r"audit still-running is running .* wait for it to finish") as err:
            plan()
        assert "\n" not in str(err.value)
    audits.mark_finished(store, "still-running")
    assert store_admin.execute(store_admin.plan_delete_audit(store, "lonely")) == n + record
    assert not (copy / prefix).exists()


def test_gc_removes_only_what_no_record_references(copy: Path, finished_audits: dict[str, dict]) -> None:
    store = open_store(str(copy))
    m = model_dir(finished_audits)
    refs = record_prefixes(copy)
    named = set().union(*refs.values())
    used = sorted(named)[0]
    plant(copy, f"{m}/trace/feedfacefeedface/part-00000.parquet", 10_000)  # a killed stage's finished part
    plant(copy, f"{m}/trace/feedfacefeedface/part-00001.parquet", 3_000)
    plant(copy, f"{used}/.part.parquet{TMP_MARK}abcd1234", 777)  # a killed writer's temp file in a used prefix
    plant(copy, "patches/deleted-audit/p/adapter_model.safetensors", 2_048)  # an audit since deleted
    plant(copy, "audits/deleted-audit/report.log", 100)
    plant(copy, f"audits/.x.json{TMP_MARK}00000000", 50, age_s=7200)  # an old temp record: its writer is gone
    plant(copy, f"audits/.y.json{TMP_MARK}11111111", 60)  # a record being written now: kept
    plant(copy, "NOTES.txt", 10)  # not ours: kept
    before = walk_sizes(copy)

    def goes(key: str) -> bool:
        parts = key.split("/")
        if parts[0] == m:
            return "/".join(parts[:3]) not in named or TMP_MARK in parts[-1]
        return parts[:2] in (["patches", "deleted-audit"], ["audits", "deleted-audit"]) or key.endswith("00000000")

    expected = {k for k in before if goes(k)}
    plan = store_admin.plan_gc(store)
    assert plan.bytes == sum(before[k] for k in expected)
    freed = store_admin.execute(plan)
    after = walk_sizes(copy)
    assert set(after) == set(before) - expected
    assert freed == sum(before[k] for k in expected) == sum(before.values()) - sum(after.values())
    assert store_admin.plan_gc(store).empty
    all_load(store, copy)


def test_s3_usage_and_gc(s3_env: str, home: Path, finished_audits: dict[str, dict]) -> None:
    import boto3

    root = Path(finished_audits["step1"]["store_uri"])
    make_bucket(s3_env, "admin")
    client = boto3.client("s3", endpoint_url=s3_env)
    sizes = walk_sizes(root, temps=False)
    for key in sizes:
        client.upload_file(str(root / key), "admin", f"pre/{key}")
    s3 = open_store("s3://admin/pre")
    local = store_admin.usage(open_store(str(root)))
    u = store_admin.usage(s3)
    assert u.total_bytes == sum(sizes.values())
    assert [(x.model, x.bytes, x.unreferenced_bytes) for x in u.models] == [
        (x.model, x.bytes, x.unreferenced_bytes) for x in local.models
    ]
    assert [(a.audit_id, a.own_bytes, a.shared_bytes) for a in u.audits] == [
        (a.audit_id, a.own_bytes, a.shared_bytes) for a in local.audits
    ]
    orphan = f"{model_dir(finished_audits)}/trace/feedfacefeedface/part-00000.parquet"
    s3.put_bytes(orphan, b"x" * 5000)
    # a killed writer's unfinished multipart upload (one part of 1234 bytes uploaded) in a used prefix
    used = sorted(set().union(*record_prefixes(root).values()))[0]
    up = client.create_multipart_upload(Bucket="admin", Key=f"pre/{used}/big.parquet")["UploadId"]
    client.upload_part(Bucket="admin", Key=f"pre/{used}/big.parquet", UploadId=up, PartNumber=1, Body=b"y" * 1234)
    assert store_admin.usage(s3).leftover_bytes == 1234
    plan = store_admin.plan_gc(s3)
    assert plan.units.get(orphan.rsplit("/", 1)[0]) == 5000
    assert plan.leftovers == {f"{used}/big.parquet?uploadId={up}": 1234}
    assert store_admin.execute(plan) == plan.bytes and not s3.exists(orphan)
    assert not client.list_multipart_uploads(Bucket="admin").get("Uploads")
    assert store_admin.usage(s3).total_bytes == sum(sizes.values()) + 5000 - (plan.bytes - 1234)
