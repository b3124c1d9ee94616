"""Universal checkpointing: save, convert, load and inspect (DESIGN §3, §6)."""
from megatron.checkpointing.agree import as_checkpoint_error, raise_if_any_failed
from megatron.checkpointing.async_save import AsyncSaver, wait_for_async_saves
from megatron.checkpointing.convert import ConversionReport, convert_to_universal
from megatron.checkpointing.load import Loaded, load_checkpoint
from megatron.checkpointing.locate import ALWAYS, IF_NEW, NEVER, resolve_checkpoint
from megatron.checkpointing.lock import acquire_folder_lock, release_folder_lock
from megatron.checkpointing.reader import CheckpointReader, read_manifest
from megatron.checkpointing.safetensors_io import CheckpointError
from megatron.checkpointing.save import check_save_folder, save_checkpoint

__all__ = ["ALWAYS", "AsyncSaver", "IF_NEW", "NEVER", "CheckpointError", "CheckpointReader", "ConversionReport", "Loaded",
           "acquire_folder_lock", "as_checkpoint_error", "check_save_folder", "convert_to_universal",
           "load_checkpoint", "raise_if_any_failed", "read_manifest", "release_folder_lock", "resolve_checkpoint",
           "save_checkpoint", "wait_for_async_saves"]
