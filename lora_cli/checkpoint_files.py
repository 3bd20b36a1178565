"""The files around the weights: configs and tokenizer copied, config updated, provenance recorded."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from lora_cli import __version__
from lora_cli.errors import InputError
from lora_cli.filenames import BASE_CARD, CARD, CONFIG, INDEX_FILE, PROVENANCE_FILE
from lora_cli.io.atomic import replace_with, write_new
from lora_cli.io.checkpoint import PICKLE_SUFFIXES
from lora_cli.io.files import read_regular
from lora_cli.io.jsonio import load_json
from lora_cli.ties import KEY as TIE_KEY
from lora_cli.ties import set_tied

# huggingface_hub's cache folders, one per repo: `<type>s--<org>--<name>/{blobs,refs,snapshots}`.
HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
SKIPPED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".msgpack", ".h5", ".gguf", ".onnx")


def copy_side_files(source: Path, out: Path) -> list[str]:
    """Copy the base's non-weight files (configs, tokenizer, chat template); never its weights or our own record.

    Each is copied from inside the source folder only: a symlink leading elsewhere (to a token, a key) would put
    that file into an output that is usually uploaded, so it is refused. The Hugging Face cache's links from
    `snapshots/<commit>/` to `blobs/` stay inside the repo's cache folder and are followed.
    """
    source = Path(source)
    root = _allowed_root(source.resolve())
    copied = []
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name in (INDEX_FILE, PROVENANCE_FILE) or path.is_dir():
            continue
        if path.suffix in SKIPPED_SUFFIXES or path.name.startswith("adapter_"):
            continue
        if path.name == CARD and (source / BASE_CARD).exists():
            continue  # a loractl output's card describes that output; the original base card travels as it is
        if path.is_symlink() and not path.exists():
            continue  # a dangling link carries nothing (an interrupted download); it was never copied
        target = path.resolve()
        if not target.is_relative_to(root):
            raise InputError(
                f"is a symbolic link to {target}, outside {root}; loractl would copy it into OUT",
                path=path,
                fix="put the real file in the folder, or remove the link",
            )
        name = BASE_CARD if path.name == CARD else path.name  # README.md is the new checkpoint's card (card.py)
        write_new(out / name, read_regular(path))
        copied.append(name)
    return copied


def _allowed_root(folder: Path) -> Path:
    """The folder side files may resolve into: the folder itself, or for a Hub cache snapshot
    (`models--org--name/snapshots/<commit>`) the repo's cache folder, which holds the `blobs/` its links name."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(HUB_REPO_PREFIXES):
        return folder.parent.parent
    return folder


def update_config(
    out: Path, *, dtype: str | None, vocab_size: int | None, tie: bool | None = None, dequantized: bool = False
) -> dict[str, object]:
    """Rewrite OUT/config.json where the merge changed the model (`tie`: set tie_word_embeddings; `dequantized`:
    drop quantization_config, the weights are plain now); returns changes."""
    path = out / CONFIG
    if not path.exists():
        return {}
    config = load_json(path)
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
    if dequantized:
        for holder in (config, text or {}):
            if holder.pop("quantization_config", None) is not None:
                changes["quantization_config"] = "removed"
    if changes:
        replace_with(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return changes


def write_provenance(out: Path, record: dict[str, object]) -> dict[str, object]:
    """loractl.json: what this checkpoint was made from, so `inspect` and `diff` can say so later."""
    full = {
        "tool": "loractl",
        "loractl_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    write_new(out / PROVENANCE_FILE, (json.dumps(full, indent=2, default=str) + "\n").encode())
    return full


def read_provenance(directory: Path) -> dict | None:
    path = Path(directory) / PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        return load_json(path)
    except InputError:
        return None
