"""Regular expressions from adapter configs (`rank_pattern`, `alpha_pattern`, regex `target_modules`,
`exclude_modules`, `feedforward_modules`), matched with PEFT's rules but with a bounded engine.

Python's `re` backtracks without limit: `(.*.*)*Z` takes seconds on a 14-character module name and hours on a
real one, so a hostile or careless config would hang every command. The `regex` package matches with the same
syntax and semantics and takes a `timeout`; a pattern that exceeds its budget is refused, naming the config key.
`regex` is not one of loractl's declared dependencies: `transformers` (which is) depends on it, so it is
installed wherever loractl is.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import regex

from lora_cli.errors import InputError

# No real module name (at most a few hundred characters) takes a pattern a millisecond; each match may take this
# long, and each pattern this long in all, before it is refused.
MATCH_SECONDS = 0.2
PATTERN_BUDGET_SECONDS = 2.0
_spent: dict[str, float] = {}


def _refuse(key: str, pattern: str, why: str, path: Path | None, fix: str) -> InputError:
    return InputError(f"{key} pattern {pattern!r} {why}", path=path, fix=fix)


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> regex.Pattern[str]:
    return regex.compile(source)


def _match(source: str, name: str, *, key: str, pattern: str, path: Path | None, full: bool) -> bool:
    try:
        compiled = _compile(source)
    except (regex.error, OverflowError, RecursionError) as exc:
        fix = f"fix {key} in the adapter config"
        raise _refuse(key, pattern, f"is not a valid regular expression ({exc})", path, fix) from None
    left = PATTERN_BUDGET_SECONDS - _spent.get(source, 0.0)
    started = time.perf_counter()
    try:
        if left <= 0:
            raise TimeoutError
        method = compiled.fullmatch if full else compiled.match
        found = method(name, timeout=min(MATCH_SECONDS, left)) is not None
    except TimeoutError:
        fix = f"simplify {key} in the adapter config: nested repeats such as (.*)* backtrack without end"
        raise _refuse(
            key, pattern, f"takes too long to match {name!r} (the bounded matcher gave up)", path, fix
        ) from None
    finally:
        _spent[source] = _spent.get(source, 0.0) + time.perf_counter() - started
    return found


def suffix_match(pattern: str, name: str, *, key: str, path: Path | None = None) -> bool:
    """PEFT's rule for `rank_pattern`/`alpha_pattern` keys: `re.match(rf"(.*\\.)?({pattern})$", name)`."""
    return _match(rf"(.*\.)?({pattern})$", name, key=key, pattern=pattern, path=path, full=False)


def full_match(pattern: str, name: str, *, key: str, path: Path | None = None) -> bool:
    """PEFT's rule for a string `target_modules`, `exclude_modules` or `feedforward_modules`: `re.fullmatch`."""
    return _match(pattern, name, key=key, pattern=pattern, path=path, full=True)


def pattern_value(config: dict, key: str, module_path: str, default: object, *, path: Path | None = None) -> object:
    """The value `config[key]` (a `rank_pattern`-style map of pattern -> value) gives `module_path`: the first
    pattern that matches as a suffix, as PEFT's `get_pattern_key` picks it, else `default`."""
    patterns = config.get(key)
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise InputError(
            f"{key} must be an object mapping module patterns to values, not {type(patterns).__name__}",
            path=path,
            fix=f"fix {key} in the adapter config, or re-save the adapter",
        )
    for pattern, value in patterns.items():
        if suffix_match(pattern, module_path, key=key, path=path):
            return value
    return default
