"""Random tensors, dtypes and shard layouts round-tripped between our streaming reader/writer and `safetensors`.

Both directions: we read what `safetensors.torch.save_file` writes, and `safetensors.torch.load_file` reads what
`ShardWriter` writes (by computed tensors and by byte-range copies). Comparisons are bit-exact on the raw bytes,
so NaN payloads, -0.0 and zero-size and 0-d tensors all count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_cli.io.checkpoint import INDEX_FILE, open_checkpoint
from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS
from lora_cli.io.safetensors_file import read_header, read_tensor
from lora_cli.io.writer import OutputTensor, ShardWriter, plan_shards, write_index

DTYPES = sorted(SAFETENSORS_TO_TORCH)  # every dtype we accept, F8 included
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.text(alphabet="abcxyz019._-é中", min_size=1, max_size=10)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)  # () is a scalar; a 0 makes it empty


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    """A dict of tensors of random dtypes and shapes, filled with random bytes (NaNs and all)."""
    specs = draw(st.dictionaries(names, st.tuples(st.sampled_from(DTYPES), shapes), min_size=1, max_size=8))
    tensors = {}
    for name, (dtype_name, shape) in specs.items():
        dtype = SAFETENSORS_TO_TORCH[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
        if dtype == torch.bool:
            raw = bytes(b & 1 for b in raw)  # a bool byte other than 0 or 1 is not a bool
        tensors[name] = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
            if nbytes
            else torch.empty(shape, dtype=dtype)
        )
    return tensors


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert tuple(got[name].shape) == tuple(tensor.shape), name
        assert raw_bytes(got[name]) == raw_bytes(tensor), name


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, assignment: list[int]) -> None:
    """Shards written by safetensors, with a transformers-style index when there is more than one."""
    folder.mkdir()
    count = max(assignment) + 1
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for (name, tensor), shard in zip(tensors.items(), assignment, strict=True):
        filename = "model.safetensors" if count == 1 else f"model-{shard + 1:05d}-of-{count:05d}.safetensors"
        shards.setdefault(filename, {})[name] = tensor
    for filename, part in shards.items():
        save_file(part, folder / filename, metadata={"format": "pt"})
    if count > 1:
        weight_map = {name: filename for filename, part in shards.items() for name in part}
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@SETTINGS
@given(tensors=state_dicts(), data=st.data())
def test_we_read_what_safetensors_writes(tensors, data, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("st") / "ckpt"
    assignment = data.draw(st.lists(st.integers(0, 2), min_size=len(tensors), max_size=len(tensors)))
    # Shard numbers must be dense (0..k-1) for the file names to be a real layout.
    dense = {old: new for new, old in enumerate(sorted(set(assignment)))}
    save_sharded(tensors, folder, [dense[a] for a in assignment])

    index = open_checkpoint(folder)
    assert_same({name: read_tensor(info) for name, info in index.tensors.items()}, tensors)
    for shard in index.shards:
        assert read_header(shard.path).metadata == {"format": "pt"}


@SETTINGS
@given(tensors=state_dicts(), data=st.data())
def test_safetensors_reads_what_we_write(tensors, data, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("ours")
    # A source file to copy byte ranges from, as merge does for untouched tensors.
    save_file(tensors, root / "source.safetensors")
    source = read_header(root / "source.safetensors")
    order = data.draw(st.permutations(list(tensors)))
    outputs = [OutputTensor(n, TORCH_TO_SAFETENSORS[tensors[n].dtype], tuple(tensors[n].shape)) for n in order]
    max_shard = data.draw(st.one_of(st.none(), st.integers(1, 256)))
    shards = plan_shards(outputs, ["source.safetensors"] * len(outputs), max_shard)
    copy = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    copied = {name for name, flag in zip(order, copy, strict=True) if flag}

    out = root / "out"
    out.mkdir()
    for shard in shards:
        writer = ShardWriter(out / shard.filename, shard, {"format": "pt"})
        for planned in shard.tensors:
            if planned.name in copied:
                info = source.tensors[planned.name]
                writer.copy_tensors([planned.name], info.file, info.offset, info.nbytes)
            else:
                writer.write_tensor(planned.name, tensors[planned.name])
        writer.close()
    if len(shards) > 1:
        write_index(out, shards)

    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(out / shard.filename)
        assert set(part) == {t.name for t in shard.tensors}
        with safe_open(out / shard.filename, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        loaded.update(part)
    assert_same(loaded, tensors)
    # And our own reader agrees, through the index when there is one.
    index = open_checkpoint(out)
    assert [info.name for info in index.tensors.values()] == order
    assert_same({name: read_tensor(info) for name, info in index.tensors.items()}, tensors)
    if max_shard is not None and len(shards) > 1:
        # Greedy re-sharding: a shard exceeds the limit only when one tensor alone does.
        assert all(s.nbytes <= max_shard or len(s.tensors) == 1 for s in shards)
