"""Random bit flips, truncations and deletions over data files, manifests, pointers and the
universal folder: every load either reads exactly the original tensors and state, or fails
before any training with one line naming the damaged file. Zero silent wrong loads."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.checkpointing import CheckpointError, CheckpointReader, resolve_checkpoint
from megatron.checkpointing.inspect import describe_checkpoint
from megatron.checkpointing.reader import STATES
from megatron.testing.tamper import read_header, reseal, write_file_with_header
from tests.test_reliability import trained  # noqa: F401 (fixture)

pytestmark = pytest.mark.faults
CASES = 120


def load_everything(folder: str, universal: bool) -> tuple[dict, dict]:
    """What a resume reads, on every rank together: the pointer, the manifest, every tensor."""
    path = resolve_checkpoint(folder, universal)
    reader = CheckpointReader(path)
    if reader.kind != ("universal" if universal else "native"):
        pointer = "latest_universal" if universal else "latest"
        raise CheckpointError(f"{path} (named by {os.path.join(folder, pointer)}) is a {reader.kind} checkpoint")
    tensors = {}
    for name, shape in reader.canonical.items():
        for s in STATES:
            t = reader.read_region(name, ((0,) * len(shape), shape), s)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path}: {name} ({s}) holds NaN or Inf")
            tensors[f"{name}/{s}"] = t
    return reader.manifest["state"], tensors


def _targets(folder: str) -> list[tuple[str, bool]]:
    """(file relative to the folder, loaded as universal) for everything the two loads read."""
    out = [("latest", False), ("latest_universal", True)]
    for sub, universal in (("global_step4", False), ("global_step4_universal", True)):
        out += [(os.path.join(sub, f), universal) for f in sorted(os.listdir(os.path.join(folder, sub)))]
    return out


def _corrupt(path: str, rng: random.Random) -> str:
    data = bytearray(open(path, "rb").read())
    kind = rng.choice(["flip", "flip", "truncate", "delete"])
    if kind == "delete" or not data:
        os.remove(path)
        return "delete"
    if kind == "truncate":
        open(path, "wb").write(bytes(data[:rng.randrange(len(data))]))
        return "truncate"
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))
    return "flip"


@pytest.fixture(scope="module")
def pristine(trained):
    folder = trained[0]
    return {u: load_everything(folder, u) for u in (False, True)}


def _same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_random_corruption_is_detected_naming_the_file(trained, pristine, tmp_path) -> None:
    rng = random.Random(16)
    outcomes = {"detected": 0, "harmless": 0}
    base = trained[0]
    targets = _targets(base)
    for case in range(CASES):
        folder = shutil.copytree(base, str(tmp_path / f"c{case}"))
        target, universal = targets[case % len(targets)] if case < len(targets) else rng.choice(targets)
        kind = _corrupt(os.path.join(folder, target), rng)
        try:
            loaded = load_everything(folder, universal)
        except CheckpointError as e:
            message = str(e)
            assert "\n" not in message, message
            assert os.path.basename(target) in message or (kind == "delete" and "manifest" in target
                                                           and "manifest.json" in message), (target, kind, message)
            outcomes["detected"] += 1
            if not target.startswith("latest"):
                with pytest.raises(CheckpointError):
                    describe_checkpoint(os.path.join(folder, os.path.dirname(target)))  # the inspector agrees
        else:
            assert _same(loaded, pristine[universal]), f"silent wrong load: {kind} of {target}"
            outcomes["harmless"] += 1
        shutil.rmtree(folder)
    print(f"corruption trials: {CASES}, detected {outcomes['detected']}, harmless (identical load) "
          f"{outcomes['harmless']}, silent wrong loads 0")
    assert outcomes["detected"] >= CASES * 0.8


# --- fuzzing: hypothesis mutates manifests and safetensors headers --------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data) -> object:
    paths = [p for p in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["set", "delete", "add"]))
    if action == "delete":
        parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    return doc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_loads_identically_or_fails_in_one_line(trained, pristine, tmp_path_factory, data) -> None:
    folder = shutil.copytree(trained[0], str(tmp_path_factory.mktemp("fuzz") / "C"))
    step = os.path.join(folder, "global_step4")
    manifest = json.load(open(os.path.join(step, "manifest.json")))
    json.dump(_mutate(manifest, data), open(os.path.join(step, "manifest.json"), "w"))
    resealed = data.draw(st.booleans())
    if resealed:  # a hostile writer that recomputes every checksum: the values it writes are its own
        reseal(step)
    _load_or_one_line_error(folder, "manifest.json", pristine[False], compare_state=not resealed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_header_loads_identically_or_fails_in_one_line(trained, pristine, tmp_path_factory,
                                                                           data) -> None:
    folder = shutil.copytree(trained[0], str(tmp_path_factory.mktemp("fuzz") / "C"))
    step = os.path.join(folder, "global_step4")
    file = data.draw(st.sampled_from(sorted(f for f in os.listdir(step) if f.endswith(".safetensors"))))
    header, payload = read_header(os.path.join(step, file))
    write_file_with_header(os.path.join(step, file), _mutate(header, data), payload)
    reseal(step)
    _load_or_one_line_error(folder, file, pristine[False])


def _load_or_one_line_error(folder: str, file: str, expected, compare_state: bool = True) -> None:
    try:
        loaded = load_everything(folder, universal=False)
    except CheckpointError as e:
        assert "\n" not in str(e) and file in str(e), str(e)
    else:
        if not compare_state:
            loaded = (expected[0], loaded[1])
        assert _same(loaded, expected), f"silent wrong load after fuzzing {file}"
