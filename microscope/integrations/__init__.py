"""The training job's side of Microscope: sign and POST "checkpoint ready" messages (`notify`), and
callbacks that send one for every checkpoint a Lightning or Hugging Face Trainer writes.

Importing this package is cheap: Lightning and transformers load only when their callback is first used
(`microscope.integrations.MicroscopeCallback`, `.MicroscopeTrainerCallback`); boto3 only for an upload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microscope.integrations.notify import Notifier, NotifyError, notify_checkpoint, signed_headers

if TYPE_CHECKING:
    from microscope.integrations.hf import MicroscopeTrainerCallback
    from microscope.integrations.lightning import MicroscopeCallback

__all__ = [
    "MicroscopeCallback",
    "MicroscopeTrainerCallback",
    "Notifier",
    "NotifyError",
    "notify_checkpoint",
    "signed_headers",
]

_LAZY = {
    "MicroscopeCallback": "microscope.integrations.lightning",
    "MicroscopeTrainerCallback": "microscope.integrations.hf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
