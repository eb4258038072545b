"""What the store holds and what may go: space per model and audit, which audits reference which artifact
prefixes, and plans to delete an audit, a model's artifacts or everything no record references.

    usage(store) -> Usage                        models and audits with their bytes (shared artifacts once)
    references(store) -> dict[audit, [prefix]]  artifact prefixes each audit record names
    plan_delete_audit(store, audit_id) -> Plan   its record, its patches and the artifacts only it names
    plan_delete_model(store, digest) -> Plan     the model's artifact prefixes, once no record names them
    plan_gc(store) -> Plan                       prefixes no record names, temp leftovers, orphan patches
    execute(plan) -> int                         bytes freed

A plan that would break something raises `InputError` in one line naming the blocking audit and the fix:
an audit still running (its in-flight marker, or a held stage lock on a prefix to delete) or a record that
still names an artifact. The unit of deletion is the stage prefix `{digest[:16]}/{stage}/{config_hash}`:
the runner publishes whole prefixes (manifest last), so a prefix is either used by a record or not.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from microscope.errors import InputError
from microscope.store import TMP_MARK, ArtifactStore, LocalStore, S3Store

DIGEST_DIR = re.compile(r"^[0-9a-f]{16}$")  # a model's folder: stages.runner.stage_prefix's digest[:16]
LEFTOVER_AGE_S = 3600.0  # a temp file outside any stage prefix this old has no writer left (records are small)


def human_bytes(n: int) -> str:
    """Bytes as people read them (binary units), as everywhere else in the viewer and the report."""
    from microscope.formatting import fmt

    return fmt(n, "bytes")


# ---- the listing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """Every file of the store with its size: finished ones, and what killed writers left (temp files
    locally, unfinished multipart uploads on S3) with their age in seconds."""

    files: dict[str, int]
    leftovers: dict[str, tuple[int, float]]  # key (S3: "key?uploadId=..") -> (bytes, age_s)


def listing(store: ArtifactStore) -> Listing:
    """The store's files and sizes in one pass (a walk locally, paginated listings on S3)."""
    if isinstance(store, LocalStore):
        return _local_listing(store)
    if isinstance(store, S3Store):
        return _s3_listing(store)
    return Listing({k: store.size(k) or 0 for k in store.list("")}, {})  # another store: one size call per key


def _local_listing(store: LocalStore) -> Listing:
    files: dict[str, int] = {}
    left: dict[str, tuple[int, float]] = {}
    now = time.time()
    for folder, _, names in os.walk(store.root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed since the walk saw it
                continue
            key = os.path.relpath(path, store.root).replace(os.sep, "/")
            if TMP_MARK in name:
                left[key] = (st.st_size, now - st.st_mtime)
            else:
                files[key] = st.st_size
    return Listing(files, left)


def _s3_listing(store: S3Store) -> Listing:
    base = f"{store.prefix}/" if store.prefix else ""
    strip = len(base)
    files: dict[str, int] = {}
    pages = store._call(
        lambda: list(store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=base))
    )
    for page in pages:
        files |= {o["Key"][strip:]: int(o["Size"]) for o in page.get("Contents", [])}
    left: dict[str, tuple[int, float]] = {}
    now = time.time()
    for u in store._call(store.client.list_multipart_uploads, Bucket=store.bucket, Prefix=base).get("Uploads", []):
        parts = store._call(store.client.list_parts, Bucket=store.bucket, Key=u["Key"], UploadId=u["UploadId"])
        size = sum(int(p["Size"]) for p in parts.get("Parts", []))
        left[f"{u['Key'][strip:]}?uploadId={u['UploadId']}"] = (size, now - u["Initiated"].timestamp())
    return Listing(files, left)


def unit_of(key: str) -> str | None:
    """The deletable unit a key belongs to: its stage prefix (`digest/stage/hash`), an audit's patches
    (`patches/<audit>`) or logs (`audits/<audit>`), an audit record (`audits/<id>.json`); None for anything
    else (in-flight markers, foreign files: kept, never planned)."""
    parts = key.split("/")
    if DIGEST_DIR.match(parts[0]) and len(parts) >= 4:
        return "/".join(parts[:3])
    if parts[0] == "patches" and len(parts) >= 3:
        return "/".join(parts[:2])
    if parts[0] == "audits" and len(parts) == 2 and key.endswith(".json"):
        return key
    if parts[0] == "audits" and len(parts) >= 3 and parts[1] != "in-flight":
        return "/".join(parts[:2])
    return None


# ---- the records and what they name -----------------------------------------------------------


@dataclass(frozen=True)
class AuditInfo:
    audit_id: str
    model: str | None  # the model's folder (digest[:16]); None when ingest failed
    status: str
    created_at: str
    source: str
    prefixes: frozenset[str]  # the stage prefixes its record names


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _named(raw: dict[str, Any], prefixes: set[str]) -> frozenset[str]:
    """The prefixes among `prefixes` that the record names anywhere (artifact URIs, details' prefixes, the
    report): matched on path components, so a record written by a store since moved or copied still counts."""
    out = set()
    for text in _strings({k: v for k, v in raw.items() if k != "config"}):
        parts = text.split("/")
        for i in range(len(parts) - 2):
            if DIGEST_DIR.match(parts[i]) and (p := "/".join(parts[i : i + 3])) in prefixes:
                out.add(p)
    return frozenset(out)


def _audits(store: ArtifactStore, lst: Listing) -> dict[str, AuditInfo]:
    """Every record's audit and the prefixes it names. An unreadable record refuses: what it names is unknown,
    so nothing may be deleted until it is restored or removed."""
    prefixes = {u for k in lst.files if (u := unit_of(k)) and DIGEST_DIR.match(u.split("/")[0])}
    out = {}
    for key in sorted(k for k in lst.files if unit_of(k) == k and k.startswith("audits/")):
        try:
            raw = json.loads(store.get_bytes(key))
            info = AuditInfo(
                audit_id=raw["audit_id"],
                model=(raw.get("model_digest") or "")[:16] or None,
                status=str(raw.get("status")),
                created_at=str(raw.get("created_at")),
                source=str((raw.get("model") or {}).get("source", "")),
                prefixes=_named(raw, prefixes),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"audit record {store.uri_for(key)} is unreadable ({type(exc).__name__}), so what it references "
                "is unknown; restore it from a backup or delete that file, then plan again"
            ) from None
        out[info.audit_id] = info
    return out


def references(store: ArtifactStore) -> dict[str, list[str]]:
    """Audit id -> the stage prefixes its record names (artifact URIs, details, report), sorted."""
    return {a: sorted(i.prefixes) for a, i in _audits(store, listing(store)).items()}


# ---- usage ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditUsage:
    audit_id: str
    model: str | None
    status: str
    created_at: str
    source: str
    own_bytes: int  # its record, its patches and the prefixes no other audit names: what deleting it frees
    shared_bytes: int  # prefixes other audits name too (counted once, in the model's total)
    shared_with: tuple[str, ...]


@dataclass(frozen=True)
class ModelUsage:
    model: str  # digest[:16], the folder name
    bytes: int  # every file under the folder, once, plus its audits' records and patches
    unreferenced_bytes: int  # prefixes no record names: what `gc` frees
    audits: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    uri: str
    models: list[ModelUsage]
    audits: list[AuditUsage]
    total_bytes: int  # every finished file in the store
    leftover_bytes: int  # temp files / unfinished uploads
    other_bytes: int  # files outside models, records and patches (markers, probes, anything foreign)


def _belongings(audit_id: str) -> tuple[str, str, str]:
    """The units that are an audit's own whatever it references: its record, its logs, its patches."""
    return f"audits/{audit_id}.json", f"audits/{audit_id}", f"patches/{audit_id}"


def _unit_sizes(lst: Listing) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for key, n in lst.files.items():
        if (u := unit_of(key)) is not None:
            sizes[u] = sizes.get(u, 0) + n
    return sizes


def usage(store: ArtifactStore) -> Usage:
    lst = listing(store)
    infos = _audits(store, lst)
    sizes = _unit_sizes(lst)
    users: dict[str, set[str]] = {}
    for a, info in infos.items():
        for p in info.prefixes:
            users.setdefault(p, set()).add(a)
    audits = []
    owned: dict[str, int] = {}  # audit -> its record and patches
    for a, info in sorted(infos.items(), key=lambda kv: kv[1].created_at):
        owned[a] = sum(sizes.get(u, 0) for u in _belongings(a))
        alone = [p for p in info.prefixes if users[p] == {a}]
        shared = [p for p in info.prefixes if users[p] != {a}]
        audits.append(
            AuditUsage(
                audit_id=a,
                model=info.model,
                status=info.status,
                created_at=info.created_at,
                source=info.source,
                own_bytes=owned[a] + sum(sizes.get(p, 0) for p in alone),
                shared_bytes=sum(sizes.get(p, 0) for p in shared),
                shared_with=tuple(sorted(set().union(*(users[p] for p in shared)) - {a})) if shared else (),
            )
        )
    models = []
    for m in sorted({u.split("/")[0] for u in sizes if DIGEST_DIR.match(u.split("/")[0])}):
        mine = [u for u in sizes if u.startswith(f"{m}/")]
        its = tuple(a for a, i in infos.items() if i.model == m)
        models.append(
            ModelUsage(
                model=m,
                bytes=sum(sizes[u] for u in mine) + sum(owned[a] for a in its),
                unreferenced_bytes=sum(sizes[u] for u in mine if u not in users),
                audits=its,
            )
        )
    folders = {x.model for x in models}
    counted = sum(x.bytes for x in models) + sum(owned[a] for a, i in infos.items() if i.model not in folders)
    return Usage(
        uri=store.uri,
        models=models,
        audits=audits,
        total_bytes=sum(lst.files.values()),
        leftover_bytes=sum(n for n, _ in lst.leftovers.values()),
        other_bytes=sum(lst.files.values()) - counted,
    )


# ---- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a deletion removes, in the order `execute` removes it: records first (an audit disappears before
    its artifacts, so a stop half way leaves only unreferenced files, which `gc` finds), then leftovers, then
    logs, patches and stage prefixes. Sizes in bytes from the store's listing."""

    store: ArtifactStore = field(repr=False, compare=False)
    what: str  # "audit ID", "model DIGEST", "unused artifacts"
    records: dict[str, int]  # audits/<id>.json -> bytes
    units: dict[str, int]  # stage prefixes and patches folders -> bytes
    leftovers: dict[str, int]  # temp files / unfinished uploads -> bytes
    kept: dict[str, tuple[str, ...]] = field(default_factory=dict)  # prefix -> the other audits naming it

    @property
    def bytes(self) -> int:
        return sum(self.records.values()) + sum(self.units.values()) + sum(self.leftovers.values())

    @property
    def empty(self) -> bool:
        return not (self.records or self.units or self.leftovers)

    def lines(self) -> list[str]:
        """The plan for people: one line per thing removed, then what stays and why, then the total."""
        out = [f"  record   {k}  ({human_bytes(n)})" for k, n in sorted(self.records.items())]
        out += [f"  {kind_of(k):<8} {k}  ({human_bytes(n)})" for k, n in sorted(self.units.items())]
        out += [f"  leftover {k}  ({human_bytes(n)})" for k, n in sorted(self.leftovers.items())]
        out += [f"  kept     {k}  (also used by {', '.join(a)})" for k, a in sorted(self.kept.items())]
        n = len(self.records) + len(self.units) + len(self.leftovers)
        out.append(f"{self.what}: {n} item(s), {human_bytes(self.bytes)} to free in {self.store.uri}")
        return out


def kind_of(unit: str) -> str:
    return "prefix" if _is_prefix(unit) else unit.split("/")[0].replace("audits", "logs")


def _lock_holder(store: ArtifactStore, prefix: str) -> str | None:
    """Who holds the stage lock of `prefix` (the runner's name for it), None when it is free: a try, no wait."""
    from microscope.locks import LockTimeout, lock_path

    s = store.settings
    if not s.redis_url and not lock_path(_lock_name(store, prefix), s.lock_dir).exists():
        return None  # a holder creates the file first: none there, none held (and a look creates nothing)
    try:
        with _stage_lock(store, prefix):
            return None
    except LockTimeout as exc:
        return exc.holder or "an unknown holder"


def _stage_lock(store: ArtifactStore, prefix: str) -> Any:
    from microscope.locks import stage_lock

    s = store.settings
    return stage_lock(
        _lock_name(store, prefix), lock_dir=s.lock_dir, redis_url=s.redis_url, lease_s=s.lock_lease_s, wait_s=0
    )


def _lock_name(store: ArtifactStore, prefix: str) -> str:
    return f"{store.uri}|{prefix}"  # the runner's name for it: stages.runner.stage_lock


def _refuse_running(store: ArtifactStore, what: str) -> None:
    """An audit still running may be using cached prefixes its record (saved at its end) does not name yet."""
    from microscope.audits import IN_FLIGHT, in_flight

    if running := in_flight(store):
        a = running[0].audit_id
        raise InputError(
            f"cannot delete {what}: audit {a} is running (started {running[0].created_at:%Y-%m-%d %H:%M} UTC) and may "
            f"use these artifacts; wait for it to finish, or if it was killed remove {store.uri_for(f'{IN_FLIGHT}/{a}.json')}"
        )


def _refuse_locked(store: ArtifactStore, what: str, prefixes: list[str]) -> None:
    for p in sorted(prefixes):
        if (holder := _lock_holder(store, p)) is not None:
            raise InputError(
                f"cannot delete {what}: {p} is being computed (its stage lock is held by {holder}); "
                "wait for that audit to finish, then plan again"
            )


def _find(wanted: str, names: list[str], kind: str, store: ArtifactStore, hint: str) -> str:
    """`wanted` among `names`, or the one name it is a unique prefix of."""
    if wanted in names:
        return wanted
    matches = [n for n in names if n.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise InputError(
            f"'{wanted}' matches {len(matches)} {kind}s ({', '.join(sorted(matches)[:3])}); give more of it"
        )
    raise InputError(f"no {kind} '{wanted}' in {store.uri}; {hint}")


def plan_delete_audit(store: ArtifactStore, audit_id: str) -> Plan:
    """The audit's record, its patches and the prefixes no other record names (those others name are kept)."""
    lst = listing(store)
    infos = _audits(store, lst)
    a = _find(audit_id, list(infos), "audit", store, "`microscope list` shows the audits there")
    sizes = _unit_sizes(lst)
    others: dict[str, list[str]] = {}
    for b, info in infos.items():
        for p in info.prefixes:
            if b != a:
                others.setdefault(p, []).append(b)
    alone = {p: sizes[p] for p in infos[a].prefixes if p not in others}
    what = f"audit {a}"
    _refuse_running(store, what)
    _refuse_locked(store, what, list(alone))
    own = {u: sizes[u] for u in _belongings(a)[1:] if u in sizes}
    left = {k: n for k, (n, _) in lst.leftovers.items() if unit_of(k.split("?")[0]) in (own | alone)}
    return Plan(
        store=store,
        what=f"delete audit {a}",
        records={f"audits/{a}.json": sizes[f"audits/{a}.json"]},
        units=own | alone,
        leftovers=left,
        kept={p: tuple(sorted(others[p])) for p in infos[a].prefixes if p in others},
    )


def plan_delete_model(store: ArtifactStore, model_digest: str) -> Plan:
    """Every artifact prefix of the model (its digest, or a unique prefix of it): refused while a record
    names one of them (delete those audits first, which frees what only they name)."""
    lst = listing(store)
    sizes = _unit_sizes(lst)
    folders = sorted({u.split("/")[0] for u in sizes if DIGEST_DIR.match(u.split("/")[0])})
    m = _find(model_digest.lower()[:16], folders, "model", store, "`microscope gc` lists the models there")
    infos = _audits(store, lst)
    units = {u: n for u, n in sizes.items() if u.startswith(f"{m}/")}
    users = sorted((i for i in infos.values() if i.prefixes & set(units)), key=lambda i: i.created_at)
    what = f"model {m}"
    if users:
        more = (
            f" (and {len(users) - 1} more audit(s): {', '.join(i.audit_id for i in users[1:4])})" if users[1:] else ""
        )
        raise InputError(
            f"cannot delete {what}: audit {users[0].audit_id} references its artifacts{more}; delete the audits "
            f"first (`microscope delete {users[0].audit_id}`), which frees what only they use"
        )
    _refuse_running(store, what)
    _refuse_locked(store, what, list(units))
    left = {k: n for k, (n, _) in lst.leftovers.items() if k.startswith(f"{m}/")}
    return Plan(store=store, what=f"delete model {m}", records={}, units=units, leftovers=left)


def plan_gc(store: ArtifactStore) -> Plan:
    """Everything no record names: stage prefixes (cached results nobody reads, a killed stage's parts), the
    patches of audits since deleted, and what killed writers left (temp files, unfinished uploads). A prefix
    whose stage lock is held is being computed: left alone."""
    lst = listing(store)
    infos = _audits(store, lst)
    _refuse_running(store, "unused artifacts")
    sizes = _unit_sizes(lst)
    named = set().union(*(i.prefixes for i in infos.values())) if infos else set()
    units = {}
    for u, n in sizes.items():
        if _is_prefix(u):
            if u not in named:
                units[u] = n
        elif u.count("/") == 1 and not u.endswith(".json") and u.split("/")[1] not in infos:
            units[u] = n  # the patches or logs of an audit whose record is gone
    busy = {u for u in {unit_of(k.split("?")[0]) for k in lst.leftovers} | set(units) if u and _is_prefix(u)}
    busy = {u for u in busy if _lock_holder(store, u) is not None}
    units = {u: n for u, n in units.items() if u not in busy}
    left = {}
    for k, (n, age) in lst.leftovers.items():
        u = unit_of(k.split("?")[0])
        if (u is not None and _is_prefix(u) and u not in busy) or age > LEFTOVER_AGE_S:
            left[k] = n
    return Plan(store=store, what="delete unused artifacts", records={}, units=units, leftovers=left)


def _is_prefix(unit: str) -> bool:
    return bool(DIGEST_DIR.match(unit.split("/")[0]))


def execute(plan: Plan) -> int:
    """Carry the plan out; the bytes freed. Refused like the plan if an audit started since; a stage prefix
    whose lock was taken since is left alone (a stage started computing it), and so is its share of the bytes."""
    store = plan.store
    if any(_is_prefix(u) for u in plan.units):  # an audit started since the plan may have found them cached
        _refuse_running(store, plan.what.removeprefix("delete "))
    freed = 0
    for key, n in plan.records.items():
        store.delete(key)
        freed += n
    for key, n in plan.leftovers.items():  # before their prefixes: an upload aborted twice is an error on S3
        _delete_leftover(store, key)
        freed += n
    for unit, n in plan.units.items():
        if not _is_prefix(unit):
            store.delete_prefix(unit)
            freed += n
            continue
        from microscope.locks import LockTimeout

        try:
            with _stage_lock(store, unit):  # no stage can start on it while it goes
                store.delete_prefix(unit)
        except LockTimeout:
            continue
        freed += n
    return freed


def _delete_leftover(store: ArtifactStore, key: str) -> None:
    if isinstance(store, S3Store) and "?uploadId=" in key:
        name, _, upload = key.partition("?uploadId=")
        store._call(store.client.abort_multipart_upload, Bucket=store.bucket, Key=store._key(name), UploadId=upload)
    elif isinstance(store, LocalStore):
        (store.root / key).unlink(missing_ok=True)  # not `delete`: temp names are not keys it accepts everywhere
    else:
        store.delete(key)
