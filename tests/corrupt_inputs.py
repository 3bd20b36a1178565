"""Broken and hostile inputs, each made from a pristine copy in the test: the corpus `test_bad_inputs` runs through
every command.

A case copies the pristine base and adapter into its own folder and breaks one thing. It names the file the
error message must name (`culprit`) so that a test can check that the user is told where the problem is.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save_file

INDEX = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Pristine:
    """Good inputs every case starts from: a sharded base, a LoRA adapter for it, one for another model."""

    base: Path
    adapter: Path
    other_names: Path  # an adapter for another architecture (its targets are not in the base)
    other_shapes: Path  # an adapter for a wider model of the same architecture
    merged: Path  # base merged with adapter: what diff and unmerge are given


@dataclass(frozen=True)
class Inputs:
    """What a command is given for one case, and the file or folder its error message must name."""

    base: Path
    adapter: Path
    out: Path
    culprit: str
    marker: Path | None = None  # a file that exists only if a hostile pickle's code ran


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Pristine], Inputs]
    # "input" breaks an input file; "output" the OUT path; "values" tensor values (not the file's structure);
    # "side_file" a file that only commands writing OUT copy (tokenizer, generation config).
    kind: str = "input"


# ---------------------------------------------------------------- raw safetensors surgery


def read_raw(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (as parsed JSON) and its data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_raw(path: Path, header: dict, body: bytes, *, claimed_length: int | None = None) -> None:
    """Write a header and data as given, without any of the checks a real writer makes."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    length = len(raw) if claimed_length is None else claimed_length
    path.write_bytes(struct.pack("<Q", length) + raw + body)


def load_copy(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in memory (not mmapped: the cases overwrite the file they read)."""
    return load(path.read_bytes())


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


class RunsCode:
    """Pickles to a call of `open(marker, "w")`: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def hostile_pickle(path: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """A torch.save file that looks like weights but runs code (creates `marker`) when unpickled."""
    state: dict[str, object] = dict(tensors or {"weight": torch.zeros(2, 2)})
    state["payload"] = RunsCode(marker)
    torch.save(state, path)


# ---------------------------------------------------------------- helpers for cases


def _copy(root: Path, pristine: Pristine, adapter: Path | None = None) -> tuple[Path, Path, Path]:
    base = shutil.copytree(pristine.base, root / "base")
    lora = shutil.copytree(adapter or pristine.adapter, root / "lora")
    return Path(base), Path(lora), root / "out"


def _shards(base: Path) -> list[Path]:
    return sorted(base.glob("model-*.safetensors"))


def _base_case(mutate: Callable[[Path, Path], str]) -> Callable[[Path, Pristine], Inputs]:
    """A case that breaks the base; `mutate(base, root)` returns the culprit's name."""

    def build(root: Path, pristine: Pristine) -> Inputs:
        base, lora, out = _copy(root, pristine)
        return Inputs(base, lora, out, mutate(base, root))

    return build


def _adapter_case(mutate: Callable[[Path], str]) -> Callable[[Path, Pristine], Inputs]:
    def build(root: Path, pristine: Pristine) -> Inputs:
        base, lora, out = _copy(root, pristine)
        return Inputs(base, lora, out, mutate(lora))

    return build


def _edit_header(mutate: Callable[[dict, bytes], tuple[dict, bytes]], shard_index: int = -1):
    def apply(base: Path, root: Path) -> str:
        shard = _shards(base)[shard_index]
        header, body = read_raw(shard)
        header, body = mutate(header, body)
        write_raw(shard, header, body)
        return shard.name

    return apply


def _edit_config(mutate: Callable[[dict], None]) -> Callable[[Path], str]:
    def apply(lora: Path) -> str:
        path = lora / ADAPTER_CONFIG
        config = json.loads(path.read_text())
        mutate(config)
        path.write_text(json.dumps(config))
        return ADAPTER_CONFIG

    return apply


def _poison(value: float) -> Callable[[Path], str]:
    def apply(lora: Path) -> str:
        tensors = load_copy(lora / ADAPTER_FILE)
        key = next(k for k in sorted(tensors) if "lora_B" in k)
        tensors[key][0, 0] = value
        save_file(tensors, lora / ADAPTER_FILE)
        return lora.name

    return apply


# ---------------------------------------------------------------- the cases


def _truncate(base: Path, root: Path) -> str:
    shard = _shards(base)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _header_past_file(base: Path, root: Path) -> str:
    shard = _shards(base)[-1]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1000)
    shard.write_bytes(bytes(data))
    return shard.name


def _header_of_gigabytes(base: Path, root: Path) -> str:
    shard = _shards(base)[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 6 * 2**30)
    shard.write_bytes(bytes(data))
    return shard.name


def _offsets_past_file(header: dict, body: bytes) -> tuple[dict, bytes]:
    last = header[tensors_by_offset(header)[-1]]
    begin, end = last["data_offsets"]
    # Grow shape and range together so that only the range beyond the data is wrong.
    last["shape"] = [(end - begin) // 4 + 16]
    last["dtype"] = "F32"
    last["data_offsets"] = [begin, begin + last["shape"][0] * 4]
    return header, body


def _overlap(header: dict, body: bytes) -> tuple[dict, bytes]:
    last = header[tensors_by_offset(header)[-1]]
    last["data_offsets"] = [o - 4 for o in last["data_offsets"]]
    return header, body[:-4]


def _gap(header: dict, body: bytes) -> tuple[dict, bytes]:
    last = header[tensors_by_offset(header)[-1]]
    begin, end = last["data_offsets"]
    last["data_offsets"] = [begin + 8, end + 8]
    return header, body[:begin] + bytes(8) + body[begin:]


def _unknown_dtype(header: dict, body: bytes) -> tuple[dict, bytes]:
    header[tensors_by_offset(header)[0]]["dtype"] = "F7"
    return header, body


def _header_lists_tensor_twice(base: Path, root: Path) -> str:
    """The same tensor name twice in one header's JSON (a parser keeping the last would never notice)."""
    shard = _shards(base)[0]
    header, body = read_raw(shard)
    name = tensors_by_offset(header)[0]
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    text = text[:-1] + ", " + entry + "}"
    raw = text.encode() + b" " * (-len(text.encode()) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return shard.name


def _index_missing_shard(base: Path, root: Path) -> str:
    index = json.loads((base / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (base / INDEX).write_text(json.dumps(index))
    return "model-00009-of-00009.safetensors"


def _index_points_elsewhere(base: Path, root: Path) -> str:
    """The index maps a tensor to a shard that does not hold it (the tensor is listed under two shards)."""
    index = json.loads((base / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[-1]
    (base / INDEX).write_text(json.dumps(index))
    return INDEX


def _index_lists_tensor_twice(base: Path, root: Path) -> str:
    """The index's weight_map names a tensor twice, pointing at two shards (json would keep the last silently)."""
    index = json.loads((base / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[-1])
    text = json.dumps(index)
    text = text[:-2] + f", {json.dumps(name)}: {json.dumps(shards[0])}" + "}}"
    (base / INDEX).write_text(text)
    return INDEX


def _index_not_json(base: Path, root: Path) -> str:
    (base / INDEX).write_text('{"weight_map": {')
    return INDEX


def _tensor_in_two_shards(base: Path, root: Path) -> str:
    first, last = _shards(base)[0], _shards(base)[-1]
    header, body = read_raw(first)
    name = tensors_by_offset(header)[0]
    begin, end = header[name]["data_offsets"]
    last_header, last_body = read_raw(last)
    last_header[name] = {**header[name], "data_offsets": [len(last_body), len(last_body) + end - begin]}
    write_raw(last, last_header, last_body + body[begin:end])
    return last.name


def _pickle_as_safetensors(base: Path, root: Path) -> str:
    shard = _shards(base)[0]
    torch.save(load_copy(shard), shard)
    return shard.name


def _pickle_only_base(root: Path, pristine: Pristine) -> Inputs:
    base, lora, out = _copy(root, pristine)
    for path in base.glob("*.safetensors*"):
        path.unlink()
    marker = root / "pwned-base"
    hostile_pickle(base / "pytorch_model.bin", marker)
    return Inputs(base, lora, out, base.name, marker)


def _hostile_pickle_as_safetensors(root: Path, pristine: Pristine) -> Inputs:
    base, lora, out = _copy(root, pristine)
    shard = _shards(base)[0]
    marker = root / "pwned-shard"
    hostile_pickle(shard, marker, load_copy(shard))
    return Inputs(base, lora, out, shard.name, marker)


def _hostile_adapter_bin(root: Path, pristine: Pristine) -> Inputs:
    base, lora, out = _copy(root, pristine)
    tensors = load_copy(lora / ADAPTER_FILE)
    (lora / ADAPTER_FILE).unlink()
    marker = root / "pwned-adapter"
    hostile_pickle(lora / "adapter_model.bin", marker, tensors)
    return Inputs(base, lora, out, "adapter_model.bin", marker)


def _adapter_truncated(lora: Path) -> str:
    path = lora / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[:-64])
    return ADAPTER_FILE


def _adapter_is_pickle(lora: Path) -> str:
    path = lora / ADAPTER_FILE
    torch.save(load_copy(path), path)
    return ADAPTER_FILE


def _config_not_json(lora: Path) -> str:
    (lora / ADAPTER_CONFIG).write_text("{'peft_type': 'LORA',")
    return ADAPTER_CONFIG


def _other_base(which: str) -> Callable[[Path, Pristine], Inputs]:
    def build(root: Path, pristine: Pristine) -> Inputs:
        base, lora, out = _copy(root, pristine, getattr(pristine, which))
        return Inputs(base, lora, out, lora.name)

    return build


def _out_is_symlink(root: Path, pristine: Pristine) -> Inputs:
    base, lora, out = _copy(root, pristine)
    target = root / "elsewhere"
    target.mkdir()
    out.symlink_to(target, target_is_directory=True)
    return Inputs(base, lora, out, out.name)


def _out_dangling_symlink(root: Path, pristine: Pristine) -> Inputs:
    base, lora, out = _copy(root, pristine)
    out.symlink_to(root / "nowhere")
    return Inputs(base, lora, out, out.name)


def _out_parent_dangling_symlink(root: Path, pristine: Pristine) -> Inputs:
    base, lora, _ = _copy(root, pristine)
    parent = root / "link"
    parent.symlink_to(root / "missing-folder", target_is_directory=True)
    return Inputs(base, lora, parent / "out", "out")


CASES: list[Case] = [
    Case("truncated_shard", _base_case(_truncate)),
    Case("header_length_past_file", _base_case(_header_past_file)),
    Case("header_of_6_gb", _base_case(_header_of_gigabytes)),
    Case("offsets_past_file", _base_case(_edit_header(_offsets_past_file))),
    Case("offsets_overlap", _base_case(_edit_header(_overlap))),
    Case("offsets_leave_gap", _base_case(_edit_header(_gap))),
    Case("unknown_dtype", _base_case(_edit_header(_unknown_dtype, 0))),
    Case("header_lists_tensor_twice", _base_case(_header_lists_tensor_twice)),
    Case("index_names_missing_shard", _base_case(_index_missing_shard)),
    Case("index_points_to_wrong_shard", _base_case(_index_points_elsewhere)),
    Case("index_lists_tensor_twice", _base_case(_index_lists_tensor_twice)),
    Case("index_not_json", _base_case(_index_not_json)),
    Case("tensor_in_two_shards", _base_case(_tensor_in_two_shards)),
    Case("pickle_named_safetensors", _base_case(_pickle_as_safetensors)),
    Case("hostile_pickle_named_safetensors", _hostile_pickle_as_safetensors),
    Case("hostile_pickle_only_base", _pickle_only_base),
    Case("adapter_truncated", _adapter_case(_adapter_truncated)),
    Case("adapter_safetensors_is_pickle", _adapter_case(_adapter_is_pickle)),
    Case("hostile_adapter_bin", _hostile_adapter_bin),
    Case("adapter_config_not_json", _adapter_case(_config_not_json)),
    Case("adapter_config_without_peft_type", _adapter_case(_edit_config(lambda c: c.pop("peft_type")))),
    Case("adapter_config_r_zero", _adapter_case(_edit_config(lambda c: c.update(r=0)))),
    Case("adapter_config_negative_alpha", _adapter_case(_edit_config(lambda c: c.update(lora_alpha=-16)))),
    Case("adapter_nan", _adapter_case(_poison(float("nan"))), kind="values"),
    Case("adapter_inf", _adapter_case(_poison(float("-inf"))), kind="values"),
    Case("adapter_for_other_architecture", _other_base("other_names")),
    Case("adapter_for_other_shapes", _other_base("other_shapes")),
    Case("out_is_symlink", _out_is_symlink, kind="output"),
    Case("out_is_dangling_symlink", _out_dangling_symlink, kind="output"),
    Case("out_parent_is_dangling_symlink", _out_parent_dangling_symlink, kind="output"),
]


# ---------------------------------------------------------------- issue 17: hostile and broken inputs a probe found

# Backtracks past any budget, even in the `regex` engine (which gives up on `(.*.*)*Z` at once).
RUNAWAY_PATTERN = r"((.|\w)*)*\d\d[^\w.]"
DEEP = 5000


def _write_header_text(shard: Path, text: bytes, body: bytes) -> None:
    raw = text + b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _header_text(edit: Callable[[dict, bytes], bytes]) -> Callable[[Path, Path], str]:
    """A case that rewrites a shard's header as raw bytes (what json.dumps cannot produce)."""

    def apply(base: Path, root: Path) -> str:
        shard = _shards(base)[0]
        header, body = read_raw(shard)
        _write_header_text(shard, edit(header, body), body)
        return shard.name

    return apply


def _shape_of_bools(header: dict, body: bytes) -> bytes:
    """A shape [true, N]: Python counts True as 1, so the byte range still adds up; safetensors refuses a bool."""
    name = tensors_by_offset(header)[0]
    begin, end = header[name]["data_offsets"]
    header[name].update(dtype="U8", shape=[True, end - begin])
    return json.dumps(header).encode()


def _numel_overflows(header: dict, body: bytes) -> bytes:
    """A zero-size tensor whose first dimensions multiply past 2**64 (safetensors refuses it; torch cannot hold it)."""
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["overflow"] = {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [end, end]}
    return json.dumps(header).encode()


def _header_bom(header: dict, body: bytes) -> bytes:
    return b"\xef\xbb\xbf" + json.dumps(header).encode()


def _metadata_list(header: dict, body: bytes) -> bytes:
    header["__metadata__"] = []
    return json.dumps(header).encode()


def _header_nested(header: dict, body: bytes) -> bytes:
    text = json.dumps(header)
    return (text[:-1] + ', "deep": ' + "[" * DEEP + "]" * DEEP + "}").encode()


def _header_long_int(header: dict, body: bytes) -> bytes:
    name = tensors_by_offset(header)[0]
    text = json.dumps(header)
    end = header[name]["data_offsets"][1]
    return text.replace(f"{end}]", "9" * 5000 + "]", 1).encode()


def _nested_json(path: Path) -> None:
    text = path.read_text()
    path.write_text(text.rstrip()[:-1] + ', "deep": ' + "[" * DEEP + "]" * DEEP + "}")


def _json_case(name: str, where: str) -> Callable[[Path, Path], str] | Callable[[Path], str]:
    """Break a JSON input (`where`: base or adapter) named `name` with deep nesting."""

    def apply_base(base: Path, root: Path) -> str:
        _nested_json(base / name)
        return name

    def apply_adapter(lora: Path) -> str:
        _nested_json(lora / name)
        return name

    return apply_base if where == "base" else apply_adapter


def _long_int_in_config(lora: Path) -> str:
    path = lora / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    text = json.dumps(config).replace(f'"lora_alpha": {config["lora_alpha"]}', '"lora_alpha": 1' + "0" * 5000)
    path.write_text(text)
    return ADAPTER_CONFIG


def _huge_int_in_config(lora: Path) -> str:
    """An integer Python parses (under its 4,300-digit limit) that overflows a float: 10**400 / r."""
    path = lora / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    text = json.dumps(config).replace(f'"lora_alpha": {config["lora_alpha"]}', '"lora_alpha": 1' + "0" * 400)
    path.write_text(text)
    return ADAPTER_CONFIG


def _long_int_in_index(base: Path, root: Path) -> str:
    text = (base / INDEX).read_text()
    index = json.loads(text)
    total = index["metadata"]["total_size"]
    (base / INDEX).write_text(text.replace(str(total), "7" * 5000, 1))
    return INDEX


def _index_metadata(value: object) -> Callable[[Path, Path], str]:
    def apply(base: Path, root: Path) -> str:
        index = json.loads((base / INDEX).read_text())
        index["metadata"] = value
        (base / INDEX).write_text(json.dumps(index))
        return INDEX

    return apply


def _fifo(where: str, name: str | Callable[[Path], str]) -> Callable[[Path, Pristine], Inputs]:
    """Replace an input file by a named pipe: opening it for reading would wait for a writer forever."""

    def build(root: Path, pristine: Pristine) -> Inputs:
        base, lora, out = _copy(root, pristine)
        folder = base if where == "base" else lora
        file = name(folder) if callable(name) else name
        if file == "adapter_model.bin":
            (lora / ADAPTER_FILE).unlink()
        path = folder / file
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return Inputs(base, lora, out, file)

    return build


def _first_shard(base: Path) -> str:
    return _shards(base)[0].name


def _factor(change: Callable[[torch.Tensor], torch.Tensor], which: str = "lora_A") -> Callable[[Path], str]:
    """Replace the first module's lora_A (or lora_B) by `change(it)`: wrong inner size, dimensions or dtype."""

    def apply(lora: Path) -> str:
        tensors = load_copy(lora / ADAPTER_FILE)
        key = next(k for k in sorted(tensors) if which in k)
        tensors[key] = change(tensors[key]).contiguous()
        save_file(tensors, lora / ADAPTER_FILE)
        return ADAPTER_FILE

    return apply


def _bin_adapter(state: Callable[[dict[str, torch.Tensor]], dict]) -> Callable[[Path], str]:
    def apply(lora: Path) -> str:
        tensors = load_copy(lora / ADAPTER_FILE)
        (lora / ADAPTER_FILE).unlink()
        torch.save(state(tensors), lora / "adapter_model.bin")
        return "adapter_model.bin"

    return apply


def _empty_safetensors(lora: Path) -> str:
    save_file({}, lora / ADAPTER_FILE)
    return ADAPTER_FILE


def _link_outside(name: str) -> Callable[[Path, Pristine], Inputs]:
    """A side file of the base that is a symlink to a file outside it (a token, a key)."""

    def build(root: Path, pristine: Pristine) -> Inputs:
        base, lora, out = _copy(root, pristine)
        secret = root / "secret.json"
        secret.write_text('{"token": "hf_not_for_upload"}')
        (base / name).unlink(missing_ok=True)
        (base / name).symlink_to(secret)
        return Inputs(base, lora, out, name)

    return build


def _side_fifo(root: Path, pristine: Pristine) -> Inputs:
    base, lora, out = _copy(root, pristine)
    os.mkfifo(base / "tokenizer.json")
    return Inputs(base, lora, out, "tokenizer.json")


def _out_parent_is_file(root: Path, pristine: Pristine) -> Inputs:
    base, lora, _ = _copy(root, pristine)
    (root / "notes.txt").write_text("a file, not a folder")
    return Inputs(base, lora, root / "notes.txt" / "out", "notes.txt")


def _out_name_too_long(root: Path, pristine: Pristine) -> Inputs:
    base, lora, _ = _copy(root, pristine)
    name = "m" * 300
    return Inputs(base, lora, root / name, name)


ISSUE_17_CASES: list[Case] = [
    Case(
        "rank_pattern_backtracks_without_end",
        _adapter_case(_edit_config(lambda c: c.update(rank_pattern={RUNAWAY_PATTERN: 4}))),
    ),
    Case(
        "alpha_pattern_backtracks_without_end",
        _adapter_case(_edit_config(lambda c: c.update(alpha_pattern={RUNAWAY_PATTERN: 4}))),
    ),
    Case("rank_pattern_invalid_regex", _adapter_case(_edit_config(lambda c: c.update(rank_pattern={"q_proj(": 4})))),
    Case("rank_pattern_not_an_object", _adapter_case(_edit_config(lambda c: c.update(rank_pattern=["q_proj"])))),
    Case("shard_is_a_fifo", _fifo("base", _first_shard)),
    Case("index_is_a_fifo", _fifo("base", INDEX)),
    Case("base_config_is_a_fifo", _fifo("base", "config.json")),
    Case("adapter_config_is_a_fifo", _fifo("adapter", ADAPTER_CONFIG)),
    Case("adapter_weights_are_a_fifo", _fifo("adapter", ADAPTER_FILE)),
    Case("adapter_bin_is_a_fifo", _fifo("adapter", "adapter_model.bin")),
    Case("header_shape_of_bools", _base_case(_header_text(_shape_of_bools))),
    Case("header_element_count_overflows", _base_case(_header_text(_numel_overflows))),
    Case("header_starts_with_bom", _base_case(_header_text(_header_bom))),
    Case("header_metadata_not_a_map", _base_case(_header_text(_metadata_list))),
    Case("header_nested_5000_deep", _base_case(_header_text(_header_nested))),
    Case("header_int_of_5000_digits", _base_case(_header_text(_header_long_int))),
    Case("index_nested_5000_deep", _base_case(_json_case(INDEX, "base"))),
    Case("index_int_of_5000_digits", _base_case(_long_int_in_index)),
    Case("index_metadata_not_an_object", _base_case(_index_metadata("total_size=12"))),
    Case("index_metadata_a_list", _base_case(_index_metadata([["total_size", 12]]))),
    Case("base_config_nested_5000_deep", _base_case(_json_case("config.json", "base"))),
    Case("adapter_config_nested_5000_deep", _adapter_case(_json_case(ADAPTER_CONFIG, "adapter"))),
    Case("adapter_config_int_of_5000_digits", _adapter_case(_long_int_in_config)),
    Case("adapter_config_int_overflows_a_float", _adapter_case(_huge_int_in_config)),
    Case("lora_ranks_disagree", _adapter_case(_factor(lambda b: b[:, :-1], "lora_B"))),
    Case("lora_A_is_1d", _adapter_case(_factor(lambda a: a.reshape(-1)))),
    Case("lora_A_is_0d", _adapter_case(_factor(lambda a: a.sum()))),
    Case("lora_A_is_int", _adapter_case(_factor(lambda a: (a * 100).to(torch.int32)))),
    Case("lora_A_is_bool", _adapter_case(_factor(lambda a: a > 0))),
    Case("lora_A_is_float8", _adapter_case(_factor(lambda a: a.to(torch.float8_e4m3fn)))),
    Case("adapter_bin_with_int_keys", _adapter_case(_bin_adapter(lambda t: dict(enumerate(t.values()))))),
    Case("adapter_bin_empty", _adapter_case(_bin_adapter(lambda t: {}))),
    Case("adapter_safetensors_empty", _adapter_case(_empty_safetensors)),
    Case("token_indices_not_ints", _adapter_case(_edit_config(lambda c: c.update(trainable_token_indices=["a"])))),
    Case(
        "token_indices_negative",
        _adapter_case(_edit_config(lambda c: c.update(trainable_token_indices={"embed_tokens": [-1]}))),
    ),
    Case("token_indices_not_a_list", _adapter_case(_edit_config(lambda c: c.update(trainable_token_indices=3)))),
    Case("side_file_links_outside", _link_outside("tokenizer.json"), kind="side_file"),
    Case("generation_config_links_outside", _link_outside("generation_config.json"), kind="side_file"),
    Case("side_file_is_a_fifo", _side_fifo, kind="side_file"),
    Case("out_parent_is_a_file", _out_parent_is_file, kind="output"),
    Case("out_name_too_long", _out_name_too_long, kind="output"),
]
CASES += ISSUE_17_CASES
