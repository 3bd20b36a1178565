"""The header reader tells pickles from safetensors by content, not by the first two bytes alone."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load_file

from lora_cli.io.safetensors_file import read_header, read_tensor


def test_header_of_640_bytes_is_not_mistaken_for_a_pickle(tmp_path):
    # 640 as a little-endian u64 starts with 0x80 0x02, the opening bytes of a protocol-2 pickle.
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"pad": ""}}
    header["__metadata__"]["pad"] = "x" * (640 - len(json.dumps(header).encode()))
    raw = json.dumps(header).encode()
    assert len(raw) == 640
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert torch.equal(read_tensor(read_header(path).tensors["w"]), load_file(path)["w"])
