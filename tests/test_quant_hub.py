"""A quantized base streamed from the Hub by byte range: the same merge as from a local copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.io import remote
from tests.builders_quant import build_quant_bases
from tests.hub_server import FakeHub, point_client_at

runner = CliRunner()


def _split_scales(fp8: Path, out: Path) -> Path:
    """The FP8 base with every scale in a second shard, as large FP8 checkpoints often place them."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    state = load_file(fp8 / "model.safetensors")
    scales = {k: v for k, v in state.items() if k.endswith("_scale_inv")}
    weights = {k: v for k, v in state.items() if k not in scales}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(weights, out / names[0])
    save_file(scales, out / names[1])
    weight_map = dict.fromkeys(weights, names[0]) | dict.fromkeys(scales, names[1])
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((fp8 / "config.json").read_text())
    return out


def test_streamed_fp8_base_with_scales_in_another_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bases = build_quant_bases(tmp_path / "bases")
    split = _split_scales(bases["fp8"], tmp_path / "split")
    local = runner.invoke(app, ["merge", str(split), str(bases["lora"]), str(tmp_path / "local"), "--device", "cpu"])
    assert local.exit_code == 0, local.output
    server = FakeHub()
    server.start()
    try:
        point_client_at(server, tmp_path / "hf", monkeypatch)
        monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.0)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        server.add_repo("org/fp8", {p.name: p.read_bytes() for p in split.iterdir()})
        out = tmp_path / "streamed"
        done = runner.invoke(app, ["merge", "org/fp8", str(bases["lora"]), str(out), "--device", "cpu"])
        assert done.exit_code == 0, done.output
        gets = [r for r in server.requests if r.method == "GET" and r.path.endswith(".safetensors")]
        assert gets and all(r.headers.get("range", "").startswith("bytes=") for r in gets)
    finally:
        server.stop()
    for path in (tmp_path / "local").glob("*.safetensors"):
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
