"""Universal checkpointing: save, convert, load and inspect (DESIGN §3, §6)."""
from megatron.checkpointing.convert import ConversionReport, convert_to_universal
from megatron.checkpointing.load import Loaded, load_checkpoint
from megatron.checkpointing.locate import ALWAYS, IF_NEW, NEVER, resolve_checkpoint
from megatron.checkpointing.reader import CheckpointReader, read_manifest
from megatron.checkpointing.safetensors_io import CheckpointError
from megatron.checkpointing.save import check_save_folder, save_checkpoint

__all__ = ["ALWAYS", "IF_NEW", "NEVER", "check_save_folder", "CheckpointError", "CheckpointReader", "ConversionReport", "Loaded", "convert_to_universal",
           "load_checkpoint", "read_manifest", "resolve_checkpoint", "save_checkpoint"]
