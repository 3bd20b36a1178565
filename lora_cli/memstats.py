"""Process memory as the kernel counts it: anonymous memory apart from file-backed pages.

A streaming merge reads shards whose pages the kernel may map or cache; those are file-backed and reclaimable,
not memory the merge needs. Anonymous memory (RssAnon) is what a merge really costs, so we report both.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil


@dataclass
class MemorySample:
    seconds: float
    anon: int
    file: int
    phase: str


def read_status(pid: int | None = None) -> tuple[int, int, int]:
    """(RssAnon, RssFile, RssShmem) bytes of a process from /proc/PID/status; OSError, KeyError or ValueError
    when it cannot be read (gone, or not Linux)."""
    with open(f"/proc/{pid or 'self'}/status") as handle:
        fields = dict(line.split(":", 1) for line in handle if line.startswith(("RssAnon", "RssFile", "RssShmem")))
    anon = int(fields["RssAnon"].split()[0]) * 1024
    return anon, int(fields["RssFile"].split()[0]) * 1024, int(fields.get("RssShmem", "0 kB").split()[0]) * 1024


def read_rss(pid: int | None = None) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of a process, from /proc; psutil's RSS split elsewhere."""
    try:
        anon, file, shmem = read_status(pid)
        return anon, file + shmem
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


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants alive now (from /proc/PID/stat: the field after the command name)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rfind(b")") + 2 :].split()[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass
class TreePeaks:
    """Peaks of a process tree's summed RSS, each taken independently, plus the peak of their sum."""

    anon: int = 0
    file: int = 0
    shmem: int = 0
    total: int = 0
    samples: int = 0


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and its descendants every `interval` seconds until `stop()`.

    A benchmark's view of a command run as a subprocess (which may start its own); rescanning /proc for new
    descendants is the costly part, so it is done every `rescan_every` samples.
    """

    def __init__(self, root: int, interval: float = 0.02, rescan_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.rescan_every = root, interval, rescan_every
        self.peaks = TreePeaks()
        self._stop_event = threading.Event()

    def sample(self, pids: Iterable[int]) -> None:
        anon = file = shmem = 0
        for pid in pids:
            try:
                a, f, m = read_status(pid)
            except (OSError, KeyError, ValueError):
                continue  # gone since the scan
            anon, file, shmem = anon + a, file + f, shmem + m
        p = self.peaks
        p.anon, p.file, p.shmem = max(p.anon, anon), max(p.file, file), max(p.shmem, shmem)
        p.total = max(p.total, anon + file + shmem)
        p.samples += 1

    def run(self) -> None:
        pids = [self.root]
        tick = 0
        while not self._stop_event.is_set():
            if tick % self.rescan_every == 0:
                pids = process_tree(self.root)
            self.sample(pids)
            tick += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> TreePeaks:
        self._stop_event.set()
        self.join()
        return self.peaks
