"""Edit checkpoints the way a hostile or buggy writer would, keeping every checksum consistent,
so tests reach the validation behind the checksums (for tests only)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Callable


def read_header(path: str) -> tuple[dict, bytes]:
    """A safetensors file's header and its data bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file_with_header(path: str, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def edit_manifest(folder: str, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to the manifest in place (a value it returns replaces the manifest), then make
    every checksum agree again."""
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    result = edit(manifest)
    manifest = manifest if result is None else result
    with open(path, "w") as f:
        json.dump(manifest, f)
    reseal(folder)


def reseal(folder: str) -> None:
    """Recompute every data file's size and block checksums, the rank tables' sha256 and the
    manifest's own checksum."""
    from megatron.checkpointing.manifest import seal

    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name, info in manifest["files"].items():
            file = os.path.join(folder, name)
            if not isinstance(info, dict) or not os.path.isfile(file):
                continue
            with open(file, "rb") as f:
                data = f.read()
            bs = info.get("block_size")
            if isinstance(bs, int) and bs > 0:
                info["size"] = len(data)
                info["block_sha256"] = [hashlib.sha256(data[i:i + bs]).hexdigest() for i in range(0, len(data), bs)]
        for source in manifest.get("sources", []):
            table = os.path.join(folder, source["table"]) if isinstance(source, dict) and "table" in source else None
            if table and os.path.isfile(table):
                with open(table, "rb") as f:
                    source["table_sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(path, "w") as f:
        f.write(seal(manifest) if isinstance(manifest, dict) else json.dumps(manifest))


def edit_rank_table(folder: str, rank: int, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to rank ``rank``'s own table (format 2), then make every checksum agree again."""
    path = os.path.join(folder, f"rank_{rank:05d}.json")
    with open(path) as f:
        table = json.load(f)
    edit(table)
    with open(path, "w") as f:
        json.dump(table, f)
    reseal(folder)
