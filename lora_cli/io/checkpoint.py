"""Where the tensors of a checkpoint folder are: one file, an indexed set of shards, or a bare state dict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import InputError, SwappedArgumentsError
from lora_cli.filenames import ADAPTER_FILES, CONFIG, INDEX_FILE, SINGLE_FILE
from lora_cli.io.jsonio import load_json
from lora_cli.io.remote import remote_shard, remote_shards_in
from lora_cli.io.safetensors_file import SafetensorsFile, TensorInfo, read_header

if TYPE_CHECKING:
    from lora_cli.quant.view import Quantization

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint, in file order, with the shard it lives in."""

    directory: Path
    shards: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]
    index_metadata: dict[str, object]
    # Set when quantized weights were replaced by their logical (dequantized) tensors: lora_cli/quant/view.py.
    quantization: Quantization | None = None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)

    def close(self) -> None:
        """Close every shard's descriptor (they are also closed when the index is collected)."""
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_unchanged(self) -> None:
        """Refuse, naming the shard, when any shard was modified or replaced since it was opened."""
        for shard in self.shards:
            shard.check_unchanged()

    def config(self) -> dict | None:
        """config.json when present (a plain state-dict folder has none)."""
        path = self.directory / CONFIG
        return read_json(path) if path.exists() else None


def read_json(path: Path, *, unique_keys: bool = False) -> dict:
    """Load a JSON object, turning every failure into one clear line naming the file (see `io/jsonio.py`).

    `unique_keys` refuses an object naming a key twice (an index listing a tensor twice), which json keeps quiet.
    """
    return load_json(path, unique_keys=unique_keys, missing_fix="check the path, or download the file again")


def open_checkpoint(directory: Path) -> CheckpointIndex:
    """Index a checkpoint folder, checking that the index and the shards agree. A quantized checkpoint is seen
    as its logical tensors: each quantized weight one tensor, dequantized when read (lora_cli/quant/view.py)."""
    from lora_cli.quant.view import logical_index  # the quant package builds on this module

    return logical_index(open_stored(directory))


def open_stored(directory: Path) -> CheckpointIndex:
    """Index a checkpoint folder's tensors as stored (quantized parts included)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("is not a folder", path=directory, fix="pass a checkpoint folder or a Hub repo id")
    index_path = directory / INDEX_FILE
    if index_path.exists():
        return _open_indexed(directory, index_path)
    if _present(directory / SINGLE_FILE):
        return _collect(directory, [directory / SINGLE_FILE], {})
    found = {*directory.glob("*.safetensors"), *remote_shards_in(directory)}
    candidates = sorted(p for p in found if p.name not in ADAPTER_FILES)
    if candidates:
        return _collect(directory, candidates, {})
    if any((directory / name).exists() for name in ADAPTER_FILES):
        raise SwappedArgumentsError(
            "holds a PEFT adapter, not a model checkpoint",
            path=directory,
            fix="pass the base model first and the adapter second",
        )
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"holds only pickle weights ({', '.join(pickles[:3])}), no safetensors",
            path=directory,
            fix="loractl never unpickles model weights; save the model with safe_serialization (safetensors)",
        )
    raise InputError("holds no .safetensors file", path=directory, fix="pass a folder with model.safetensors")


def _open_indexed(directory: Path, index_path: Path) -> CheckpointIndex:
    index = read_json(index_path, unique_keys=True)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError("has no valid weight_map", path=index_path, fix="repair or re-download the index")
    shard_names = list(dict.fromkeys(weight_map.values()))
    for name in shard_names:
        if Path(name).name != name:
            raise InputError(f"names a shard outside the folder: {name!r}", path=index_path)
        if not _present(directory / name):
            raise InputError(
                f"names shard {name} which is missing",
                path=index_path,
                fix="download the missing shard, or re-download the checkpoint",
            )
    metadata = index.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise InputError(
            f"has a metadata entry that is not an object ({type(metadata).__name__})",
            path=index_path,
            fix="repair or re-download the index",
        )
    checkpoint = _collect(directory, [directory / name for name in shard_names], metadata)
    for tensor, shard in weight_map.items():
        info = checkpoint.tensors.get(tensor)
        if info is None or info.file.name != shard:
            raise InputError(
                f"maps tensor {tensor!r} to {shard}, which does not hold it",
                path=index_path,
                fix="the index and the shards are from different checkpoints; re-download them together",
            )
    return checkpoint


def _present(path: Path) -> bool:
    """On disk, or streamed from the Hub (lora_cli/io/remote.py)."""
    return path.exists() or remote_shard(path) is not None


def _collect(directory: Path, files: list[Path], index_metadata: dict) -> CheckpointIndex:
    shards: list[SafetensorsFile] = []
    try:
        for path in files:
            shards.append(read_header(path))
        return _index(directory, shards, index_metadata)
    except BaseException:
        for shard in shards:
            shard.close()
        raise


def _index(directory: Path, shards: list[SafetensorsFile], index_metadata: dict) -> CheckpointIndex:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in tensors:
                raise InputError(
                    f"tensor {name!r} is stored in both {tensors[name].file.name} and {shard.path.name}",
                    path=directory,
                    fix="a checkpoint must hold each tensor once; re-export it",
                )
            tensors[name] = info
    return CheckpointIndex(directory=directory, shards=shards, tensors=tensors, index_metadata=dict(index_metadata))
