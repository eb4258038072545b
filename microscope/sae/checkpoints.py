"""SAE training checkpoints kept in the artifact store, so a fit killed on one machine resumes on another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microscope.store import ArtifactStore, LocalStore

LAST = "last.ckpt"


def checkpoint_sync(store: ArtifactStore, prefix: str) -> tuple[Path, Any | None]:
    """(the folder Lightning checkpoints into, a callback that uploads them or None).

    A local store holds the checkpoints in place. A remote one gets a local folder (seeded with the
    stored `last.ckpt` if there is one) and a callback that uploads each new `last.ckpt`."""
    if isinstance(store, LocalStore):
        return store.local_path(prefix), None
    from microscope.settings import get_settings

    local = get_settings().staging_dir() / "sae-checkpoints" / prefix
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
