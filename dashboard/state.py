"""What every page shares: the selection (kept in the URL's query parameters, so a link reopens the same
view), the store, the cached loaders and the "what is missing, and how to produce it" notices.

Selection parameters: `store` (only when it differs from the settings' store), `audit`, `compare`,
`run`, `step`, `layer` (a weight matrix's `name` in the layer table). A parameter the URL lacks is taken
from this session's last choice (page switches may drop the query string), then from a default.

Caching: records and tables go through `st.cache_data` keyed by (store URI, audit id, manifest digest),
so a recomputed stage invalidates them; the audit index and records live 10 s (a running audit's record
changes); the per-layer series of a whole run (large, read-only) through `st.cache_resource`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import streamlit as st

from microscope import glossary, results
from microscope.errors import MicroscopeError
from microscope.settings import get_settings
from microscope.store import ArtifactStore, open_store

if TYPE_CHECKING:
    import pandas as pd

    from schemas.records import AuditRecord

T = TypeVar("T")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a store can raise: a bad URI or key, an unreachable or full store (our errors), I/O, an
    invalid record, S3 (botocore: no permission, no bucket)."""
    errors: tuple[type[BaseException], ...] = (MicroscopeError, OSError, ValueError, KeyError)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return (*errors, BotoCoreError, ClientError)


READ_ERRORS = _read_errors()
PARAMS = ("store", "audit", "compare", "run", "step", "layer", "hook", "feature", "what")
INDEX_TTL_S = 10
PRODUCE = (
    "Produce one with `microscope run --model PATH_OR_HUB_ID --dataset FILE` (add `--run-id RUN --step N` "
    "for a checkpoint of a training run; `make demo` audits the demo models), or point the sidebar's store "
    "at the folder or `s3://` prefix that holds the audits (`MICROSCOPE_HOME` / `MICROSCOPE_STORE`)."
)


# ---- the selection ----------------------------------------------------------------------------


def _remembered(name: str) -> str:
    return f"_microscope_sel.{name}"


def param(name: str) -> str | None:
    """The selection `name`: the URL's, else this session's last choice."""
    value = st.query_params.get(name)
    if value is None or value == "":
        value = st.session_state.get(_remembered(name))
    return value or None


def set_param(name: str, value: Any) -> None:
    """Select `value` (None clears it) in the URL and in this session."""
    if value is None:
        st.query_params.pop(name, None)
        st.session_state.pop(_remembered(name), None)
        return
    st.query_params[name] = str(value)
    st.session_state[_remembered(name)] = str(value)


def restore_params() -> None:
    """Put this session's choices back into a URL that lost them (a page switch), so links stay whole."""
    for name in PARAMS:
        if name not in st.query_params and (value := st.session_state.get(_remembered(name))):
            st.query_params[name] = value


def choose(
    label: str,
    options: Sequence[T],
    name: str,
    *,
    default: T | None = None,
    widget: Callable[..., Any] | None = None,
    key: str | None = None,
    format_func: Callable[[T], str] = str,
    **kwargs: Any,
) -> T:
    """A picker (`st.selectbox` unless `widget` says otherwise, e.g. `st.sidebar.selectbox` or
    `st.select_slider`) whose value is the query parameter `name`: the URL's value when it is among
    `options`, else `default`, else the first option. The choice is written back to the URL."""
    if not options:
        raise ValueError(f"no options to choose {name} from")
    wanted = param(name)
    current = next((o for o in options if str(o) == wanted), None)
    if current is None and wanted is not None:  # a link or an old URL naming what is not here: say so
        near = closest(wanted, [str(o) for o in options])
        current = next((o for o in options if str(o) == near[0]), None) if near else None
        st.warning(
            f"No {label.lower()} `{wanted}` here"
            + (f". Closest: {', '.join(f'`{n}`' for n in near)}; showing `{near[0]}`." if near else ".")
        )
    if current is None:
        current = default if default is not None and default in options else options[0]
    key = key or f"_microscope_pick.{name}"
    st.session_state[key] = current  # the URL is the source of truth; the widget shows it

    def changed() -> None:
        set_param(name, st.session_state[key])

    (widget or st.selectbox)(label, options, key=key, on_change=changed, format_func=format_func, **kwargs)
    set_param(name, current)
    return current


# ---- the store --------------------------------------------------------------------------------


def default_store_uri() -> str:
    return get_settings().store_uri


def prefect_ui_url() -> str:
    """Where the Prefect UI is (PREFECT_UI_URL, else PREFECT_API_URL without /api); empty when neither is set."""
    s = get_settings()
    return s.prefect_ui_url or (s.prefect_api_url or "").removesuffix("/api")


def store_uri() -> str:
    return param("store") or default_store_uri()


def store_refused(uri: str) -> str | None:
    """Why this viewer will not open `uri` (a deployment's viewer reads only the stores it was given,
    MICROSCOPE_VIEWER_STORES), or None."""
    allowed = get_settings().viewer_stores
    norm = uri.rstrip("/")
    if not allowed or norm == default_store_uri().rstrip("/") or any(norm == a.rstrip("/") for a in allowed):
        return None
    return (
        f"This viewer reads only {', '.join(f'`{a}`' for a in allowed)}: `{uri}` is not among the stores its "
        "deployment configured (MICROSCOPE_VIEWER_STORES)."
    )


@st.cache_resource(show_spinner=False)
def _open(uri: str) -> ArtifactStore:
    return open_store(uri)


def _local_missing(uri: str) -> bool:
    return "://" not in uri.removeprefix("file://") and not Path(uri.removeprefix("file://")).expanduser().is_dir()


def store() -> ArtifactStore | None:
    """The selected store, or None (with a notice on the page) when it cannot be opened. A local folder
    that does not exist is not created: the viewer only reads."""
    uri = store_uri()
    if (why := store_refused(uri)) is not None:
        st.error(why)
        return None
    if _local_missing(uri):
        st.info(f"There is no store at `{uri}` yet: no audit has been written there. {PRODUCE}")
        return None
    try:
        return _open(uri)
    except READ_ERRORS as e:  # a bad URI or unreachable S3: say so, never raise into the page
        st.error(f"Cannot open the store `{uri}`: {e}")
        return None


@st.cache_data(ttl=INDEX_TTL_S, show_spinner=False)
def _audit_index(uri: str) -> tuple[list[results.AuditRef], list[str]]:
    unreadable: list[str] = []
    return results.list_audits(_open(uri), unreadable=unreadable), unreadable


def unreadable_records(uri: str) -> list[str]:
    """The records of the store's index that could not be read (named with why), from the last listing."""
    try:
        return _audit_index(uri)[1]
    except READ_ERRORS:
        return []


def audit_index(uri: str) -> list[results.AuditRef]:
    """Every audit in the store, oldest first (the records' JSON only). A store that failed to answer is
    not asked again within INDEX_TTL_S in this session (an unreachable S3 endpoint costs its retries once
    per rerun, not once per caller)."""
    import time

    failed = st.session_state.get("_microscope_index_error")
    if failed and failed[0] == uri and time.monotonic() - failed[1] < INDEX_TTL_S:
        raise failed[2]
    try:
        return _audit_index(uri)[0]
    except READ_ERRORS as e:
        st.session_state["_microscope_index_error"] = (uri, time.monotonic(), e)
        raise


@st.cache_data(ttl=2, show_spinner=False)
def running(uri: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """`results.running`: the audits started and not yet finished (their markers), re-read every 2 s."""
    return results.running(_open(uri), run_id)


def index_or_stop() -> tuple[ArtifactStore, list[results.AuditRef]]:
    """The store and its audits; on an unusable or empty store, a notice saying how to produce an audit,
    and the page stops there."""
    s = store()
    if s is None:
        st.stop()
    try:
        refs = audit_index(s.uri)
    except READ_ERRORS as e:  # an unreadable record in the index
        st.error(f"Cannot list the audits in `{s.uri}`: {e}")
        st.stop()
    if bad := unreadable_records(s.uri):
        st.warning(
            f"{len(bad)} audit record(s) in `{s.uri}` cannot be read and are left out: {'; '.join(bad[:3])}"
            + (" …" if len(bad) > 3 else "")
            + ". Run the audit again, or delete the record (`microscope delete AUDIT_ID`)."
        )
    if not refs:
        st.info(f"No audit in the store `{s.uri}` yet. {PRODUCE}")
        st.stop()
    return s, refs


def describe(ref: results.AuditRef) -> str:
    """An audit as pickers name it: model, run and step (or date), status, the id's tail."""
    return ref.label


def closest(wanted: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The names most like `wanted` (difflib's ratio), for "did you mean" messages."""
    from microscope.results.matrix import closest_names

    return closest_names(wanted, list(names), n=n)


def _duplicate_key(ref: results.AuditRef) -> tuple:
    return (ref.digest, ref.config_digest, ref.run_id, ref.step)


def distinct(refs: Sequence[results.AuditRef], keep: str | None = None) -> list[results.AuditRef]:
    """`refs` with audits of the same model, config, run and step collapsed to the latest (plus `keep`,
    the selected one, wherever it is): re-running an audit does not double the pickers."""
    latest: dict[tuple, results.AuditRef] = {}
    for r in refs:  # oldest first: the last one wins
        latest[_duplicate_key(r) if r.digest else (r.audit_id,)] = r
    kept = {r.audit_id for r in latest.values()} | ({keep} if keep else set())
    return [r for r in refs if r.audit_id in kept]


def resolve(refs: Sequence[results.AuditRef], wanted: str | None) -> results.AuditRef | None:
    """The audit `wanted` names (its id or a unique prefix of it); the latest when nothing is wanted."""
    if not wanted:
        return refs[-1]
    matches = [r for r in refs if r.audit_id == wanted] or [r for r in refs if r.audit_id.startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def compare_default(a: results.AuditRef, others: Sequence[results.AuditRef]) -> str:
    """What A is most usefully compared with: the same run's previous checkpoint (else its next), else the
    same weights under another config (another variant or stage set), else the latest audit of the same
    architecture, else the latest audit. Never a re-run of A itself when anything else exists."""
    rest = [r for r in others if not (r.digest and r.digest == a.digest and r.config_digest == a.config_digest)]
    rest = rest or list(others)
    if a.run_id and a.step is not None:
        run = [r for r in rest if r.run_id == a.run_id and r.step is not None]
        earlier = [r for r in run if r.step < a.step]
        later = [r for r in run if r.step > a.step]
        if earlier or later:
            return (
                max(earlier, key=lambda r: (r.step, r.created_at)) if earlier else min(later, key=lambda r: r.step)
            ).audit_id
    for same in (
        [r for r in rest if a.digest and r.digest == a.digest],
        [r for r in rest if r.model_name == a.model_name],
    ):
        if same:
            return same[-1].audit_id
    return rest[-1].audit_id


def selected_audit(refs: Sequence[results.AuditRef], name: str = "audit") -> results.AuditRef:
    """The audit the URL names (a unique id prefix is enough), else the latest. An id that matches none
    is an error naming it and the closest audits, and the page stops: never another audit's figures."""
    wanted = param(name)
    found = resolve(refs, wanted)
    if found is not None:
        return found
    assert wanted is not None
    by_id = {r.audit_id: r for r in refs}
    matches = [r for r in refs if r.audit_id.startswith(wanted)]
    what = "matches several audits" if matches else "is not in this store"
    near = matches[-3:] or [by_id[i] for i in closest(wanted, list(by_id))]
    st.error(
        f"The audit `{wanted}` named in the link {what} (`{store_uri()}`). Pick one in the sidebar"
        + (", or one of the closest below." if near else ".")
    )
    for r in near:
        if st.button(f"Open {r.label}", key=f"_microscope_near.{name}.{r.audit_id}"):
            set_param(name, r.audit_id)
            st.rerun()
    st.stop()


def audit_picker(refs: Sequence[results.AuditRef], *, widget: Callable[..., Any], key: str) -> results.AuditRef | None:
    """A picker over `refs` (newest first, repeated audits collapsed) bound to the `audit` parameter."""
    current = resolve(refs, param("audit"))
    if current is None:  # the page says what is wrong (`selected_audit`); the sidebar stays usable
        widget("Audit", ["(the link's audit is not here)"], key=f"{key}.unknown", disabled=True)
        return None
    shown = distinct(refs, keep=current.audit_id)
    newest_first = [r.audit_id for r in reversed(shown)]
    by_id = {r.audit_id: r for r in refs}
    chosen = choose(
        "Audit", newest_first, "audit", default=current.audit_id, widget=widget, key=key,
        format_func=lambda i: describe(by_id[i]),
    )  # fmt: skip
    return by_id[chosen]


# ---- cached loaders ---------------------------------------------------------------------------


@st.cache_data(ttl=INDEX_TTL_S, show_spinner=False)
def record(uri: str, audit_id: str) -> AuditRecord:
    return results.load_audit(_open(uri), audit_id)


def record_or_stop(s: ArtifactStore, audit_id: str) -> AuditRecord:
    try:
        return record(s.uri, audit_id)
    except READ_ERRORS as e:  # a record that no longer validates: say which, do not raise
        st.error(f"Cannot read the record of audit `{audit_id}` in `{s.uri}`: {e}")
        st.stop()


def digest(s: ArtifactStore, rec: AuditRecord) -> str:
    return results.manifest_digest(s, rec)


@st.cache_data(max_entries=64, show_spinner="Joining the layer table…")
def _layer_table(uri: str, audit_id: str, manifest_digest: str, _rec: AuditRecord) -> pd.DataFrame:
    del audit_id, manifest_digest  # the cache key: a recomputed stage changes the digest
    return results.layer_table(_open(uri), _rec)


def layer_table(s: ArtifactStore, rec: AuditRecord) -> pd.DataFrame:
    """`results.layer_table`, cached by (store, audit id, manifest digest); `attrs` kept."""
    return _layer_table(s.uri, rec.audit_id, digest(s, rec), rec)


@st.cache_data(ttl=INDEX_TTL_S, max_entries=16, show_spinner=False)
def _digests(uri: str, audit_ids: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    s = _open(uri)
    return tuple((a, digest(s, record(uri, a))) for a in audit_ids)


def run_key(s: ArtifactStore, refs: Sequence[results.AuditRef]) -> tuple[tuple[str, str], ...]:
    """The cache key of a run's results: its audits' ids and manifest digests (re-read every 10 s)."""
    return _digests(s.uri, tuple(r.audit_id for r in refs))


@st.cache_data(max_entries=16, show_spinner="Reading the run…")
def _run_series(uri: str, run_id: str, key: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    del key
    return results.run_series(_open(uri), run_id)


def run_series(s: ArtifactStore, run_id: str, refs: Sequence[results.AuditRef]) -> pd.DataFrame:
    """The run's headline series, cached by (store, run, its audits' ids and manifest digests)."""
    return _run_series(s.uri, run_id, run_key(s, refs))


@st.cache_resource(max_entries=4, show_spinner="Reading the run's layer tables…")
def _run_layers(uri: str, run_id: str, key: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    del key
    return results.run_series(_open(uri), run_id, layers=True)


def run_layers(s: ArtifactStore, run_id: str, refs: Sequence[results.AuditRef]) -> pd.DataFrame:
    """Every audit's layer table of the run, stacked (large and read-only: shared, never copied; do not
    modify it)."""
    return _run_layers(s.uri, run_id, run_key(s, refs))


# ---- notices ----------------------------------------------------------------------------------


def notices(missing: dict[str, str]) -> None:
    """One notice per missing part: a warning where something failed, else an info; each says how to
    produce it (the texts come from `microscope.results`)."""
    for part, why in missing.items():
        (st.warning if "failed" in why else st.info)(f"**{part}**: {why}")


def numeric_columns(df: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    import pandas as pd

    return [
        c for c in df.columns
        if c not in exclude and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    ]  # fmt: skip


@st.cache_data(max_entries=64, show_spinner=False)
def _module_table(uri: str, audit_id: str, manifest_digest: str, _rec: AuditRecord) -> pd.DataFrame:
    del uri, audit_id, manifest_digest
    return results.module_table(_rec)


def module_table(s: ArtifactStore, rec: AuditRecord) -> pd.DataFrame:
    """`results.module_table`, cached like the layer table."""
    return _module_table(s.uri, rec.audit_id, digest(s, rec), rec)


# ---- SAE features and vectors ------------------------------------------------------------------


@st.cache_resource(max_entries=8, show_spinner="Reading the features table…")
def _features(uri: str, audit_id: str, manifest_digest: str, hook: str, _rec: AuditRecord) -> pd.DataFrame:
    del audit_id, manifest_digest
    return results.features(_open(uri), _rec, hook)


def features(s: ArtifactStore, rec: AuditRecord, hook: str) -> pd.DataFrame:
    """`results.features` (large, read-only: shared, never copied; do not modify it)."""
    return _features(s.uri, rec.audit_id, digest(s, rec), hook, rec)


@st.cache_data(max_entries=256, show_spinner=False)
def feature_contexts(
    uri: str, audit_id: str, manifest_digest: str, hook: str, feature: int, _rec: AuditRecord
) -> list[dict]:
    del audit_id, manifest_digest
    return results.feature_contexts(_open(uri), _rec, hook, feature)


@st.cache_resource(max_entries=2, show_spinner="Opening the vector index…")
def _vector_index(version: float | None) -> Any:
    import tempfile

    from microscope.vectors import reader_index

    del version  # the cache key: a newer local folder means a new snapshot
    return reader_index(tempfile.mkdtemp(prefix="microscope-qdrant-"))


def vector_index() -> Any:
    """The Qdrant index to read: the server (QDRANT_URL), else a snapshot of the local folder, refreshed
    when the folder changes; None when nothing is indexed (the page says how to index)."""
    from microscope.vectors import local_version

    return _vector_index(local_version())


@st.cache_data(ttl=INDEX_TTL_S, max_entries=256, show_spinner=False)
def similar(version: float | None, collection: str, key: tuple, k: int) -> list[dict]:
    index = _vector_index(version)
    return index.similar(collection, key, k) if index is not None else []


def nearest(collection: str, key: tuple, k: int) -> list[dict]:
    """`VectorIndex.similar` through the reader index, cached per (snapshot, key, k)."""
    from microscope.vectors import local_version

    return similar(local_version(), collection, key, k)


NOT_INDEXED = (
    "Nothing is indexed in Qdrant yet: the metrics stage indexes the layers and SAE features of every audit "
    "(local folder `$MICROSCOPE_HOME/qdrant`, or the server named by `QDRANT_URL`)."
)


def choose_int(label: str, name: str, *, max_value: int, default: int = 0) -> int:
    """A number input in [0, max_value] bound to the query parameter `name` (like `choose`)."""
    wanted = param(name)
    value = int(wanted) if wanted and wanted.isdigit() and int(wanted) <= max_value else default
    if wanted and str(value) != wanted:  # a link naming what is not here: say so, never a silent substitute
        st.warning(f"No {label.lower()} `{wanted}` here ({label.lower()}s 0 to {max_value}); showing {value}.")
    key = f"_microscope_pick.{name}"
    st.session_state[key] = value  # the URL is the source of truth; the widget shows it

    def changed() -> None:
        set_param(name, st.session_state[key])

    st.number_input(label, min_value=0, max_value=max_value, step=1, key=key, on_change=changed)
    set_param(name, value)
    return value


def display(table: pd.DataFrame) -> pd.DataFrame:
    """A layer table for st.dataframe: list columns as text (exports keep the lists)."""
    shown = table.copy()
    for col in ("anomalies", "anomaly_reasons"):
        if col in shown.columns:
            shown[col] = shown[col].map(lambda v: "; ".join(v) if isinstance(v, list) else v)
    return shown


@st.cache_resource(max_entries=4, show_spinner=False)
def _run_projection(uri: str, run_id: str, key: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    return results.run_projection(_run_layers(uri, run_id, key), dims=3)


def run_projection(s: ArtifactStore, run_id: str, refs: Sequence[results.AuditRef]) -> pd.DataFrame:
    """The run's layers on its principal components (`results.run_projection`, 3 components), cached."""
    return _run_projection(s.uri, run_id, run_key(s, refs))


def projection_3d(points: pd.DataFrame, step: int) -> Any:
    """A plotly 3-D scatter of the matrices at `step`, axes fixed over the run (Vega-Lite has no 3-D)."""
    import plotly.graph_objects as go

    now = points[points["step"] == step]
    rng = {c: [float(points[c].min()), float(points[c].max())] for c in ("pc1", "pc2", "pc3")}
    fig = go.Figure(
        go.Scatter3d(
            x=now["pc1"], y=now["pc2"], z=now["pc3"], mode="markers", text=now["name"],
            marker={"size": 4, "color": now["layer"], "colorscale": "Viridis", "colorbar": {"title": "block"}},
        )
    )  # fmt: skip
    fig.update_layout(
        height=380, margin={"l": 0, "r": 0, "t": 30, "b": 0}, title=f"step {step}",
        scene={"xaxis": {"range": rng["pc1"], "title": "PC 1"}, "yaxis": {"range": rng["pc2"], "title": "PC 2"},
               "zaxis": {"range": rng["pc3"], "title": "PC 3"}},
    )  # fmt: skip
    return fig


def current_audit() -> tuple[ArtifactStore, list[results.AuditRef], AuditRecord]:
    """What most pages start from: the store, its audits and the selected audit's record (or a notice and
    a stop when there is none)."""
    s, refs = index_or_stop()
    return s, refs, record_or_stop(s, selected_audit(refs).audit_id)


@st.cache_data(max_entries=16, show_spinner=False)
def _gate_history(uri: str, run_id: str, key: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    del key
    return results.gate_history(_open(uri), run_id)


def gate_history(s: ArtifactStore, run_id: str, refs: Sequence[results.AuditRef]) -> pd.DataFrame:
    """`results.gate_history`, cached by the run's audits and their manifest digests."""
    return _gate_history(s.uri, run_id, run_key(s, refs))


# ---- step-driven charts (Evolution): built once, re-aimed per step ----------------------------------


@st.cache_data(max_entries=128, show_spinner=False)
def step_chart(key: tuple, column: str, _data: pd.DataFrame) -> str:
    """`charts.step_lines` of `column` as a template (`charts.at_step`), titled with the glossary's label;
    `key` names `_data`."""
    from dashboard import charts

    del key
    return charts.template(charts.step_lines(_data, column, charts.STEP, glossary.long_label(column)))


@st.cache_data(max_entries=8, show_spinner=False)
def projection_chart(key: tuple, _points: pd.DataFrame) -> str:
    """`charts.projection` of the run as a template, on axes fixed for the whole run."""
    from dashboard import charts

    del key
    domains = {c: [float(_points[c].min()), float(_points[c].max())] for c in ("pc1", "pc2")}
    return charts.template(charts.projection(_points, charts.STEP, domains, charts.STEP_LO))
