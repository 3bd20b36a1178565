"""The read-ahead of a cold input (`io/prefetch.py`): ranges asked for in order, a window ahead, never failing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_cli.io import prefetch
from lora_cli.io.prefetch import Prefetcher


def test_ranges_are_asked_for_a_window_ahead_of_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    data = tmp_path / "shard"
    data.write_bytes(bytes(1000))
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(prefetch, "PREFETCH_PIECE", 100)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: asked.append((offset, n)))
    # Three ranges: 250 bytes (three pieces), 100, and 400 (four pieces); a window of 300 bytes.
    ahead = Prefetcher([(data, 0, 250), (data, 250, 100), (data, 350, 400)], window=300)
    ahead.advance(0)
    ahead.advance(0)  # asking twice asks nothing more
    ahead._pool.shutdown(wait=True)  # type: ignore[union-attr]
    assert asked == [(0, 100), (100, 100), (200, 50), (250, 100)]  # pieces starting within 300 bytes
    ahead._pool = prefetch.ThreadPoolExecutor(max_workers=1)
    ahead.advance(2)
    ahead._pool.shutdown(wait=True)  # close() would cancel what is still queued
    ahead.close()
    assert asked[4:] == [(350, 100), (450, 100), (550, 100)]  # from range 2's start (350) to 650


def test_a_missing_file_is_no_error(tmp_path: Path) -> None:
    ahead = Prefetcher([(tmp_path / "gone", 0, 10)])
    ahead.advance(0)
    ahead.close()
