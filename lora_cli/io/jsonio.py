"""Every JSON input (configs, indexes, safetensors headers, provenance) is parsed here, so that every way it can be
broken becomes one `InputError` naming the file: not JSON, not UTF-8, a byte-order mark, a key listed twice,
nesting thousands deep (Python's parser raises RecursionError), or integers of thousands of digits (ValueError).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.errors import InputError
from lora_cli.io.files import MISSING_FIX, read_regular

# serde_json's limit, which the safetensors reference parser uses: no real config or header nests deeper.
MAX_DEPTH = 128
# Integers beyond 64 bits are no count, size or offset any real file holds (and some overflow a float).
MAX_INT = 2**64 - 1
REPAIR = "repair or re-download the file"


class JsonProblem(ValueError):
    """Why some bytes are not acceptable JSON; args[0] says it in a few words."""


class DuplicateKeyError(JsonProblem):
    """A JSON object names the same key twice; args[0] is the key."""


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`object_pairs_hook` for json.loads, which otherwise keeps the last of duplicate keys silently: a tensor
    listed twice in a header or an index means a corrupt file, not a choice to make for the user."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen.add(key)
    return dict(pairs)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise JsonProblem(f"holds an integer of {len(text.lstrip('-'))} digits")
    value = int(text)
    if abs(value) > MAX_INT:
        raise JsonProblem(f"holds an integer larger than 64 bits ({text})")
    return value


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in a parsed value, without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_json(raw: bytes, *, unique_keys: bool = False) -> object:
    """Parse UTF-8 JSON strictly, raising `JsonProblem` (or DuplicateKeyError) with what is wrong."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise JsonProblem("starts with a byte-order mark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonProblem("is not UTF-8") from None
    hook = reject_duplicate_keys if unique_keys else None
    try:
        value = json.loads(text, object_pairs_hook=hook, parse_int=_parse_int)
    except JsonProblem:
        raise
    except RecursionError:
        raise JsonProblem(f"nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonProblem(f"is not valid JSON ({exc})") from None
    except ValueError as exc:
        raise JsonProblem(f"is not valid JSON ({exc})") from None
    if _depth(value) > MAX_DEPTH:
        raise JsonProblem(f"nests deeper than {MAX_DEPTH} levels")
    return value


def load_json(path: Path, *, unique_keys: bool = False, missing_fix: str = MISSING_FIX) -> dict:
    """A JSON object from a regular file, every failure one clear line naming the file.

    `unique_keys` refuses an object naming a key twice (an index listing a tensor twice), which json keeps quiet.
    """
    path = Path(path)
    raw = read_regular(path, missing_fix=missing_fix)
    try:
        data = parse_json(raw, unique_keys=unique_keys)
    except DuplicateKeyError as exc:
        raise InputError(f"lists {exc.args[0]!r} twice", path=path, fix=REPAIR) from None
    except JsonProblem as exc:
        raise InputError(exc.args[0], path=path, fix=REPAIR) from None
    if not isinstance(data, dict):
        raise InputError("must hold a JSON object", path=path, fix=REPAIR)
    return data
