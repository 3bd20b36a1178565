"""Process memory as the kernel counts it: anonymous memory apart from file-backed pages.

A streaming merge reads shards whose pages the kernel may map or cache; those are file-backed and reclaimable,
not memory the merge needs. Anonymous memory (RssAnon) is what a merge really costs, so we report both.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class MemorySample:
    seconds: float
    anon: int
    file: int
    phase: str


def read_rss(pid: int | None = None) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of a process, from /proc; psutil's RSS split elsewhere."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("RssAnon", "RssFile", "RssShmem")))
        anon = int(fields["RssAnon"].split()[0]) * 1024
        file = int(fields["RssFile"].split()[0]) * 1024 + int(fields.get("RssShmem", "0 kB").split()[0]) * 1024
        return anon, file
    except (OSError, KeyError, ValueError):
        info = psutil.Process(pid or os.getpid()).memory_info()
        shared = getattr(info, "shared", 0)
        return info.rss - shared, shared


@dataclass
class MemoryMonitor:
    """Samples this process's memory in a thread; `phase` labels the timeline (load, merge, write)."""

    interval: float = 0.02
    pid: int | None = None
    samples: list[MemorySample] = field(default_factory=list)
    phase: str = "start"
    peak_anon: int = 0
    peak_file: int = 0
    baseline_anon: int = 0
    keep_timeline: bool = True

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def _sample(self) -> None:
        try:
            anon, file = read_rss(self.pid)
        except psutil.NoSuchProcess:
            return  # a watched child process has exited: its peak so far stands

        self.peak_anon = max(self.peak_anon, anon)
        self.peak_file = max(self.peak_file, file)
        if self.keep_timeline:
            self.samples.append(MemorySample(time.perf_counter() - self._start, anon, file, self.phase))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemoryMonitor:
        self.baseline_anon = read_rss(self.pid)[0]
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
