"""Hugging Face `transformers.Trainer`: tell Microscope about every `checkpoint-N` folder once it is written.

    trainer = Trainer(..., callbacks=[MicroscopeTrainerCallback(dataset="s3://b/eval.txt")])

`Trainer._save_checkpoint` (transformers 5.23) writes `<output_dir>/checkpoint-<global_step>`
(PREFIX_CHECKPOINT_DIR = "checkpoint") — model (safetensors), optimizer, scheduler, RNG and trainer state —
and `_maybe_log_save_evaluate` calls `callback_handler.on_save` right after it returns, so the folder is
complete when `on_save` runs. Only the world's process zero notifies. A hyperparameter search writes under
`<output_dir>/run-<trial>/`; when the plain path does not exist the newest such folder is used.

With `save_total_limit`, the Trainer deletes older checkpoint folders at later saves; pass `upload_to=`
(the upload happens in the notifier's thread, seconds after the save) when the audit may run after that.
Never raises into training: failures are one-line warnings on `microscope.notify`.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

from schemas.webhook import CheckpointReady
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from microscope.integrations.notify import _one_line
from microscope.integrations.sender import CheckpointSender

log = logging.getLogger("microscope.notify")


class MicroscopeTrainerCallback(CheckpointSender, TrainerCallback):
    """Notify Microscope of each checkpoint folder the Trainer saves (world process zero, after the write).

    url, secret: the receiver (default: MICROSCOPE_WEBHOOK_URL / MICROSCOPE_WEBHOOK_SECRET; checked here).
    run_id: default `args.run_name`, else the output folder's name. dataset, config, stages, tags, callback_url: passed on
    in every message. upload_to: s3://bucket/prefix to upload each checkpoint folder to first.
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
    ) -> None:
        fields = {"dataset": dataset, "config": config, "stages": stages, "tags": tags, "callback_url": callback_url}
        self._init_sender(url, secret, run_id, fields, upload_to)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        try:
            path = _checkpoint_dir(args.output_dir, state.global_step)
            run_id = self.run_id or args.run_name or os.path.basename(os.path.normpath(args.output_dir)) or "hf"
            message = CheckpointReady(checkpoint=path, run_id=run_id, step=state.global_step, **self.fields)
            self.notifier.submit(message, upload_to=self.upload_to, local_path=path if self.upload_to else None)
        except Exception as e:  # noqa: BLE001 -- never break training
            log.warning(
                "checkpoint at step %d not notified: %s", state.global_step, _one_line(f"{type(e).__name__}: {e}")
            )


def _checkpoint_dir(output_dir: str, step: int) -> str:
    name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
    path = os.path.abspath(os.path.join(output_dir, name))
    if os.path.isdir(path):
        return path
    trials = glob.glob(os.path.join(glob.escape(os.path.abspath(output_dir)), "*", name))  # hp search: run-<id>/
    if trials:
        return max(trials, key=os.path.getmtime)
    raise FileNotFoundError(f"no {name} folder under {output_dir}")
