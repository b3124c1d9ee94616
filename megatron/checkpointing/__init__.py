"""Universal checkpointing: save, convert, load and inspect (DESIGN §3, §6)."""
from megatron.checkpointing.convert import ConversionReport, convert_to_universal
from megatron.checkpointing.load import Loaded, load_checkpoint, resolve_checkpoint
from megatron.checkpointing.reader import CheckpointReader, read_manifest
from megatron.checkpointing.safetensors_io import CheckpointError
from megatron.checkpointing.save import save_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "ConversionReport", "Loaded", "convert_to_universal",
           "load_checkpoint", "read_manifest", "resolve_checkpoint", "save_checkpoint"]
