"""Universal checkpointing: save, convert, load and inspect (DESIGN §3, §6).

The names below are imported on first use: the one-process converter (convert, reader,
safetensors_io) never imports torch, which costs it seconds and half a GiB of RSS; saving and
loading do.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "as_checkpoint_error": "agree", "raise_if_any_failed": "agree",
    "AsyncSaver": "async_save", "wait_for_async_saves": "async_save",
    "ConversionReport": "convert", "convert_to_universal": "convert",
    "Loaded": "load", "load_checkpoint": "load",
    "ALWAYS": "locate", "IF_NEW": "locate", "NEVER": "locate", "resolve_checkpoint": "locate",
    "acquire_folder_lock": "lock", "release_folder_lock": "lock",
    "CheckpointReader": "reader", "read_manifest": "reader",
    "CheckpointError": "safetensors_io",
    "check_save_folder": "save", "save_checkpoint": "save",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
