"""Reading a cold base ahead while torch imports (`lora_cli/early_reads.py`): only for a merge of a local folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_cli import early_reads


def test_only_a_merge_or_unmerge_of_a_local_folder_is_read_ahead(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(bytes(100))
    assert early_reads._base_folder(["-m", "merge", str(tmp_path), "a", "out"]) == tmp_path
    assert early_reads._base_folder(["/usr/bin/loractl", "unmerge", str(tmp_path), "a", "out"]) == tmp_path
    assert early_reads._base_folder(["-m", "diff", str(tmp_path), "b"]) is None
    assert early_reads._base_folder(["-m", "merge", "org/repo", "a", "out"]) is None  # a Hub id: resolved later
    assert early_reads._base_folder(["/usr/bin/pytest", "merge", str(tmp_path)]) is None  # not our CLI


def test_the_shards_are_asked_for_up_to_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        (tmp_path / name).write_bytes(bytes(300))
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: asked.append((offset, n)))
    monkeypatch.setattr(early_reads, "PIECE", 200)
    monkeypatch.setattr(early_reads, "CAP_BYTES", 450)
    monkeypatch.setattr(early_reads, "_available_bytes", lambda: 1 << 30)
    thread = early_reads.start(["-m", "merge", str(tmp_path), "adapter", "out"])
    assert thread is not None
    thread.join()
    assert asked == [(0, 200), (200, 100), (0, 150)]  # 300 bytes of the first shard, then 150 of the second
