"""SAE training checkpoints kept in the artifact store, so a fit killed on one machine resumes on another,
and only until the SAEs of that fit are published (at 7B scale they weigh gigabytes per SAE)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from microscope.store import MANIFEST, ArtifactStore, LocalStore

LAST = "last.ckpt"
MEMBERS = "members.json"  # the stage prefixes of the SAEs a checkpoint folder trains
log = logging.getLogger("microscope.sae")


def checkpoint_sync(store: ArtifactStore, prefix: str, members: list[str]) -> tuple[Path, Any | None]:
    """(the folder Lightning checkpoints into, a callback that uploads them or None).

    A local store holds the checkpoints in place. A remote one gets a local folder (seeded with the
    stored `last.ckpt` if there is one) and a callback that uploads each new `last.ckpt`. `members` (the
    SAEs' stage prefixes) is stored beside them, so `discard_finished` knows when they are no longer needed."""
    store.put_json(f"{prefix}/{MEMBERS}", sorted(members))
    if isinstance(store, LocalStore):
        return store.local_path(prefix), None
    local = _staging(store, prefix)
    local.mkdir(parents=True, exist_ok=True)
    key = f"{prefix}/{LAST}"
    if store.exists(key) and not (local / LAST).exists():
        (local / LAST).write_bytes(store.get_bytes(key))
    return local, _uploader(store, key, local / LAST)


def _uploader(store: ArtifactStore, key: str, path: Path) -> Any:
    from lightning.pytorch.callbacks import Callback

    class UploadCheckpoint(Callback):
        """Lightning saves `last.ckpt` at the end of a batch, after the other callbacks' batch-end hooks
        (checkpoint callbacks run last), so each upload here sends the save of an earlier batch; the
        fit's end sends the final one."""

        def __init__(self) -> None:
            self.sent = 0.0

        def _send(self) -> None:
            if path.exists() and path.stat().st_mtime != self.sent:
                self.sent = path.stat().st_mtime
                store.put_file(key, path)

        def on_train_batch_end(self, *_args: Any, **_kwargs: Any) -> None:
            self._send()

        def on_train_end(self, *_args: Any, **_kwargs: Any) -> None:
            self._send()

    return UploadCheckpoint()


def discard_finished(store: ArtifactStore, root: str) -> list[str]:
    """Delete the checkpoint folders under `root` whose SAEs all have their manifest (published): no fit
    can resume into them any more. Returns the folders deleted.

    Call after publishing, never before: a kill in between leaves checkpoints of published SAEs (swept by
    the next run), never an unpublished SAE without its checkpoints. A folder of a fit that a later run
    split differently (some SAEs published before a kill) is swept once the last of them is published."""
    groups = sorted({key[len(root) + 1 :].split("/", 1)[0] for key in store.list(root) if key.startswith(root + "/")})
    done = []
    for group in groups:
        prefix = f"{root}/{group}"
        if not store.exists(f"{prefix}/{MEMBERS}"):
            continue  # a folder of an older version: what it trains is unknown, so it stays
        if all(store.exists(f"{m}/{MANIFEST}") for m in store.get_json(f"{prefix}/{MEMBERS}")):
            n = store.delete_prefix(prefix)
            if not isinstance(store, LocalStore):
                shutil.rmtree(_staging(store, prefix), ignore_errors=True)
            log.info("deleted %d training checkpoint file(s) of published SAEs at %s", n, store.uri_for(prefix))
            done.append(prefix)
    return done


def _staging(store: ArtifactStore, prefix: str) -> Path:
    return store.settings.staging_dir() / "sae-checkpoints" / prefix
