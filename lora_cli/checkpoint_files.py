"""The files around the weights: configs and tokenizer copied, config updated, provenance recorded."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from lora_cli import __version__
from lora_cli.filenames import BASE_CARD, CARD, CONFIG, INDEX_FILE, PROVENANCE_FILE
from lora_cli.io.checkpoint import PICKLE_SUFFIXES
from lora_cli.ties import KEY as TIE_KEY
from lora_cli.ties import set_tied

SKIPPED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".msgpack", ".h5", ".gguf", ".onnx")


def copy_side_files(source: Path, out: Path) -> list[str]:
    """Copy the base's non-weight files (configs, tokenizer, chat template); never its weights or our own record."""
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in (INDEX_FILE, PROVENANCE_FILE):
            continue
        if path.suffix in SKIPPED_SUFFIXES or path.name.startswith("adapter_"):
            continue
        name = BASE_CARD if path.name == CARD else path.name  # README.md is the new checkpoint's card (card.py)
        shutil.copyfile(path, out / name)
        copied.append(name)
    return copied


def update_config(
    out: Path, *, dtype: str | None, vocab_size: int | None, tie: bool | None = None
) -> dict[str, object]:
    """Rewrite OUT/config.json where the merge changed the model (`tie`: set tie_word_embeddings); returns changes."""
    path = out / CONFIG
    if not path.exists():
        return {}
    config = json.loads(path.read_text())
    changes: dict[str, object] = {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    if dtype is not None:
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = dtype
        changes["dtype"] = dtype
    if vocab_size is not None:
        target = text if text is not None and "vocab_size" in text else config
        target["vocab_size"] = vocab_size
        changes["vocab_size"] = vocab_size
    if tie is not None:
        set_tied(config, tie)
        changes[TIE_KEY] = tie
    if changes:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return changes


def write_provenance(out: Path, record: dict[str, object]) -> dict[str, object]:
    """loractl.json: what this checkpoint was made from, so `inspect` and `diff` can say so later."""
    full = {
        "tool": "loractl",
        "loractl_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return full


def read_provenance(directory: Path) -> dict | None:
    path = Path(directory) / PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
