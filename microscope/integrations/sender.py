"""What both trainer callbacks share: the receiver, the fields every message carries, and a notifier
started on first use (dropped when pickled: spawn launchers pickle callbacks, threads do not pickle)."""

from __future__ import annotations

import threading
from typing import Any

from microscope.integrations.notify import Notifier, _resolve


class CheckpointSender:
    def _init_sender(
        self,
        url: str | None,
        secret: str | None,
        run_id: str | None,
        fields: dict[str, Any],
        upload_to: str | None,
    ) -> None:
        _resolve(url, secret)  # fail now, not at the first checkpoint
        if upload_to is not None and not upload_to.startswith("s3://"):
            raise ValueError(f"upload_to={upload_to!r} must be s3://bucket or s3://bucket/prefix")
        self.url, self.secret = url, secret
        self.run_id = run_id
        # dataset, config, stages, tags, callback_url (where the audit POSTs its signed result when it ends)
        self.fields = {**fields, "tags": fields.get("tags") or {}}
        self.upload_to = upload_to
        self._notifier: Notifier | None = None
        self._lock: threading.Lock | None = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_notifier"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def notifier(self) -> Notifier:
        assert self._lock is not None
        with self._lock:
            if self._notifier is None:
                self._notifier = Notifier(self.url, self.secret)
            return self._notifier
