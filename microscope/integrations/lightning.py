"""PyTorch Lightning: tell Microscope about every checkpoint the Trainer writes, once it is on disk.

    trainer = Trainer(callbacks=[ModelCheckpoint(...), MicroscopeCallback(export="safetensors")])

Why a CheckpointIO and not a hook. Lightning (2.6) has no callback hook after a checkpoint file is written:
`Callback.on_save_checkpoint` runs inside `dump_checkpoint`, before the write; `ModelCheckpoint._save_checkpoint`
calls `trainer.save_checkpoint` → `strategy.save_checkpoint` → `strategy.checkpoint_io.save_checkpoint` and
afterwards tells only loggers (`Logger.after_save_checkpoint`). So `setup()` slips a delegating CheckpointIO
under the strategy's: its `save_checkpoint` calls the real one and, once that returns (the file is
complete), queues the message on global rank zero. This also catches `trainer.save_checkpoint(path)` calls,
whoever makes them, and works with any logger or none. Saving the same step twice (`save_last=True` writes
`last.ckpt` after `step=N.ckpt`) notifies once: the first file, which is not overwritten later.

AsyncCheckpointIO (and other `_WrappingCheckpointIO`s) return before the file is written; the delegate is
therefore placed under the innermost wrapper, next to the CheckpointIO that writes, so it runs in the
async thread right after the write completes. The step and the weights it exports come from the checkpoint
dict itself (which AsyncCheckpointIO has snapshotted), not from the live trainer, which has moved on.

Strategies that write without a CheckpointIO are not seen: DeepSpeed, ModelParallel, and FSDP with
`state_dict_type="sharded"` (a warning says so at setup); call `notify_checkpoint` after such saves.

Export. Microscope will not unpickle Lightning's `.ckpt`, so `export` first writes an auditable copy next
to it and the message carries that path instead: "safetensors" → `<stem>.safetensors` with the state dict
of `pl_module.<module_attr or "model">` (the whole LightningModule when there is no such attribute and
module_attr was not given); "hf" → `<stem>.hf/` by `save_pretrained` of that (transformers) model, plus
`pl_module.tokenizer` when it has one. Writes go to a temporary name and are renamed into place.

Never raises into training: a failure to export or queue is a one-line warning on `microscope.notify`.
With `ModelCheckpoint(save_top_k=k)` older files are deleted; pass `upload_to=` (or keep them) when the
audit may run after that.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from schemas.webhook import CheckpointReady

from microscope.integrations.notify import _one_line
from microscope.integrations.sender import CheckpointSender

log = logging.getLogger("microscope.notify")

Export = Literal["hf", "safetensors"]


class _NotifyingCheckpointIO(CheckpointIO):
    """Delegates everything to `inner`; after a successful `save_checkpoint`, tells the callback."""

    def __init__(self, inner: CheckpointIO, callback: MicroscopeCallback, trainer: Trainer) -> None:
        super().__init__()
        self.inner = inner
        self._callback = callback
        self._trainer = trainer

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self._callback._saved(self._trainer, checkpoint, path)  # never raises

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.inner.remove_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        self.inner.teardown()

    def __getattr__(self, name: str) -> Any:  # anything else a strategy asks of its CheckpointIO
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class MicroscopeCallback(CheckpointSender, Callback):
    """Notify Microscope of each checkpoint the Trainer writes (rank zero, after the write).

    url, secret: the receiver (default: MICROSCOPE_WEBHOOK_URL / MICROSCOPE_WEBHOOK_SECRET; checked here, so
    a missing one fails before training starts). run_id: default the logger's `name/version`, else the
    checkpoint folder's name. dataset, config, stages, tags, callback_url: passed on in every message. upload_to:
    s3://bucket/prefix to upload each checkpoint (or export) to first. export: "safetensors" | "hf" | None
    (see the module docstring); module_attr: the LightningModule attribute holding the model to export
    (default "model").
    """

    def __init__(
        self,
        url: str | None = None,
        secret: str | None = None,
        run_id: str | None = None,
        dataset: str | None = None,
        config: str | dict[str, Any] | None = None,
        stages: list[str] | None = None,
        tags: dict[str, str] | None = None,
        callback_url: str | None = None,
        upload_to: str | None = None,
        export: Export | None = None,
        module_attr: str | None = None,
    ) -> None:
        if export not in (None, "hf", "safetensors"):
            raise ValueError(f"export={export!r} must be 'hf', 'safetensors' or None")
        fields = {"dataset": dataset, "config": config, "stages": stages, "tags": tags, "callback_url": callback_url}
        self._init_sender(url, secret, run_id, fields, upload_to)
        self.export = export
        self.module_attr = module_attr
        self._notified_steps: set[int] = set()

    # ---- hooks ---------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            self._install(trainer)
        except Exception as e:  # noqa: BLE001 -- never break training
            log.warning("MicroscopeCallback could not hook checkpoint saving: %s", _one_line(repr(e)))

    def _install(self, trainer: Trainer) -> None:
        strategy = trainer.strategy
        self._warn_unseen(strategy)
        try:
            from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
        except ImportError:  # a later Lightning: wrap the outermost CheckpointIO
            _WrappingCheckpointIO = ()  # type: ignore[assignment]
        parent, io = None, strategy.checkpoint_io  # the property fills in a wrapper's base CheckpointIO
        while True:
            if isinstance(io, _NotifyingCheckpointIO):
                if io._callback is self:  # a second fit() with the same trainer
                    io._trainer = trainer
                    return
                parent, io = io, io.inner  # another MicroscopeCallback: each keeps its own
                continue
            if isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is not None:
                parent, io = io, io.checkpoint_io
                continue
            break
        ours = _NotifyingCheckpointIO(io, self, trainer)
        if parent is None:
            strategy.checkpoint_io = ours
        elif isinstance(parent, _NotifyingCheckpointIO):
            parent.inner = ours
        else:
            parent._checkpoint_io = ours  # its setter refuses to replace a configured base

    @staticmethod
    def _warn_unseen(strategy: Any) -> None:
        name = type(strategy).__name__
        if name in ("DeepSpeedStrategy", "ModelParallelStrategy") or (
            name == "FSDPStrategy" and getattr(strategy, "_state_dict_type", "full") == "sharded"
        ):
            log.warning(
                "%s writes checkpoints without a CheckpointIO: MicroscopeCallback will not see them; "
                "call microscope.integrations.notify_checkpoint after saving",
                name,
            )

    # ---- after a write -------------------------------------------------------------------------------

    def _saved(self, trainer: Trainer, checkpoint: dict[str, Any], path: Any) -> None:
        """The checkpoint at `path` is complete: export it if asked, then queue the message."""
        try:
            if not trainer.is_global_zero:
                return
            step = int(checkpoint.get("global_step", trainer.global_step))
            with self._lock:
                if step in self._notified_steps:
                    log.debug("checkpoint %s: step %d already notified", path, step)
                    return
                self._notified_steps.add(step)
            target = str(path)
            if "://" not in target:
                target = os.path.abspath(target)
            if self.export is not None:
                if "://" in target:
                    raise ValueError(f"export={self.export!r} needs a local checkpoint folder, not {target}")
                target = self._export(trainer.lightning_module, checkpoint, Path(target))
            if self.run_id is None:
                self.run_id = _default_run_id(trainer, target)
            message = CheckpointReady(checkpoint=target, run_id=self.run_id, step=step, **self.fields)
            local = target if self.upload_to else None
            self.notifier.submit(message, upload_to=self.upload_to, local_path=local)
        except Exception as e:  # noqa: BLE001 -- never break training
            log.warning("checkpoint %s not notified: %s", path, _one_line(f"{type(e).__name__}: {e}"))

    def _export(self, pl_module: LightningModule, checkpoint: dict[str, Any], ckpt: Path) -> str:
        attr = self.module_attr or "model"
        model = getattr(pl_module, attr, None)
        if model is None and self.module_attr is None and self.export == "safetensors":
            model, prefix = pl_module, ""
        elif model is None:
            raise ValueError(
                f"export={self.export!r}: the LightningModule has no attribute {attr!r}; pass module_attr="
            )
        else:
            prefix = f"{attr}."
        state = _state_dict(checkpoint, prefix) or model.state_dict()
        stem = ckpt.with_suffix("")
        if self.export == "safetensors":
            from safetensors.torch import save_file

            out = stem.with_name(stem.name + ".safetensors")
            tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
            save_file(_unshared(state), str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out)
            return str(out)
        if not hasattr(model, "save_pretrained"):
            raise ValueError(
                f"export='hf': pl_module.{attr} is a {type(model).__name__}, not a transformers model; "
                "use export='safetensors' or module_attr="
            )
        out = stem.with_name(stem.name + ".hf")
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            model.save_pretrained(tmp, state_dict=state)
            tokenizer = getattr(pl_module, "tokenizer", None)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(out)


def _state_dict(checkpoint: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The weights under `prefix` in the checkpoint dict (the LightningModule's state dict as saved),
    prefix removed; empty when the checkpoint holds none (a strategy that saves weights elsewhere)."""
    full = checkpoint.get("state_dict") or {}
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def _unshared(state: dict[str, Any]) -> dict[str, Any]:
    """CPU, contiguous tensors, none sharing storage (safetensors refuses tied weights: copy the ties)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _default_run_id(trainer: Trainer, target: str) -> str:
    logger = trainer.logger
    if logger is not None:
        name, version = logger.name, logger.version
        version = f"version_{version}" if isinstance(version, int) else version
        run = "/".join(str(p) for p in (name, version) if p not in (None, ""))
        if run:
            return run
    parent = Path(target).parent.name if "://" not in target else target.rstrip("/").rsplit("/", 2)[-2]
    return parent or "lightning"
