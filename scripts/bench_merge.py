"""Benchmark ``loractl merge`` against the copy floor (``cp -r && sync``) and transformers + PEFT.

Builds a synthetic Llama-shaped bf16 checkpoint and a rank-64 LoRA adapter on all seven linear modules
(see ``synthetic.py``), then times each method as a subprocess, alternating methods within every repeat so
that drift (thermal, page cache, noisy neighbours) hits all of them alike. Wall time includes interpreter
start-up and making the output durable (sync/fsync), because that is what a user waits for. Peak memory is
sampled from ``/proc/<pid>/status`` of the whole process tree every ~20 ms, keeping anonymous memory (what
a merge really allocates) apart from file-backed memory (mmapped shards, reclaimable page cache).

Examples::

    python scripts/bench_merge.py --size tiny --repeats 1           # quick end-to-end check
    python scripts/bench_merge.py --size 1b --markdown               # README numbers
    python scripts/bench_merge.py --size 7b --device both --workdir /data/bench --keep --json 7b.json
    python scripts/bench_merge.py --size 1b --base-format nf4 --markdown  # a QLoRA base, written dequantized
    python scripts/bench_merge.py --size tiny --hub --skip-peft --device cpu   # base served by a local fake Hub
    python scripts/bench_merge.py --size 1b --hub --hub-latency-ms 50 --skip-peft --device cpu  # a far-away Hub

``--hub`` serves the synthetic base from the fake Hub of ``tests/hub_server.py`` (127.0.0.1, in this process,
files held in memory: keep to tiny or 1b) and adds ``loractl-hub-stream`` (the base streamed by range, an empty
Hugging Face cache each run) and ``loractl-hub-push`` (streamed and pushed shard by shard to the same server, to
a new repo each run), each with its peak local disk: the HF cache, OUT and the push's staging folder, sampled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The environment the methods run in, taken before lora_cli is imported (it sets OMP_WAIT_POLICY for itself).
CHILD_ENV = dict(os.environ)
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402  (a sibling module, importable once scripts/ is on the path)

from lora_cli.memstats import TreePeaks, TreeSampler  # noqa: E402  (this repo's, after the path is set)
from lora_cli.peft_reference import RESULT_PREFIX  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
RATIO_TARGET = 1.2
ANON_TARGET_BYTES = {"tiny": 512 * MiB, "1b": 512 * MiB, "7b": 1 * GiB}
SPACE_MARGIN = 1.05


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Process-tree memory sampling
# ----------------------------------------------------------------------------------------------------


# The /proc sampler is lora_cli.memstats's `TreeSampler`.


class DiskSampler(threading.Thread):
    """Peak bytes of the files under some folders (symlinks not followed: the HF cache links to its blobs)."""

    def __init__(self, folders: list[Path], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.folders, self.interval, self.peak = folders, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = 0
            for folder in self.folders:
                for root, _, names in os.walk(folder):
                    for name in names:
                        with contextlib.suppress(OSError):
                            total += os.lstat(os.path.join(root, name)).st_size
            self.peak = max(self.peak, total)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def start_fake_hub(base: Path, latency_ms: float = 0.0) -> Any:
    """The fake Hub of tests/hub_server.py serving `base` as bench/base, with a token that may push; each file GET
    waits `latency_ms` first (a Hub far away: what reading ahead, several requests at once, is for)."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.hub_server import FakeHub

    hub = FakeHub()
    hub.latency_s = latency_ms / 1000
    hub.write_tokens.add("bench-token")
    hub.add_repo("bench/base", {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()})
    hub.start()
    log(f"fake Hub at {hub.url} serving {base.name} as bench/base")
    return hub


def hub_methods(hub_url: str, adapter: Path, workdir: Path, args: argparse.Namespace) -> list[Method]:
    """loractl-hub-stream and loractl-hub-push against the fake Hub; Xet off (the fake speaks LFS)."""
    cmd, env = loractl_command(args.loractl)
    home, staging = workdir / "hf-home", workdir / "push-tmp"
    env = {**env, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HF_TOKEN": "bench-token"}
    env |= {"HF_HUB_DISABLE_XET": "1", "TMPDIR": str(staging), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    pushes = iter(range(1, 10**6))
    stream = Method(
        "loractl-hub-stream",
        lambda out: [*cmd, "merge", "bench/base", str(adapter), str(out), "--device", "cpu", "--json", "--quiet"],
        env=env,
        parse_json=True,
        disk=[home],
    )

    def push_argv(out: Path) -> list[str]:
        repo = f"bench/merged-{next(pushes)}"  # a new repo each run: no shard is already on the Hub
        return [*cmd, "merge", "bench/base", str(adapter), "--push-to-hub", repo, "--device", "cpu", "--json", "-q"]

    push = Method("loractl-hub-push", push_argv, env=env, parse_json=True, disk=[home, staging])
    return [stream, push]


# ----------------------------------------------------------------------------------------------------
# Page cache and files
# ----------------------------------------------------------------------------------------------------


def files_under(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else []


def drop_cache(path: Path) -> None:
    """Ask the kernel to evict ``path``'s clean pages (no root needed); a no-op where unsupported."""
    for p in files_under(path):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    """Read every file once so that all methods start from the same, cached, input."""
    for p in files_under(path):
        with open(p, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass


def remove_output(path: Path) -> None:
    """Evict the output from the page cache, then delete it, so the next run starts clean."""
    if path.exists():
        drop_cache(path)
        shutil.rmtree(path)


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts; "" if unknown)."""
    path = path.resolve()
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def default_workdir_parent() -> Path:
    """The temp dir, unless it lives in RAM (tmpfs): then the current directory, so I/O hits a disk."""
    tmp = Path(tempfile.gettempdir())
    return Path.cwd() if fs_type(tmp) in ("tmpfs", "ramfs") else tmp


# ----------------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """Name of GPU 0 via nvidia-smi (keeps the benchmark process itself free of a CUDA context)."""
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return torch.cuda.get_device_name(0)


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "cpu": cpu_model(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernel": platform.release(),
    }


# ----------------------------------------------------------------------------------------------------
# Methods and runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """A way of producing a merged (or, for ``copy``, copied) checkpoint in ``out``."""

    name: str
    argv: Callable[[Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    parse_json: bool = False
    disk: list[Path] = field(default_factory=list)  # folders whose peak size is sampled (and emptied before a run)


@dataclass
class RunResult:
    """One timed run. ``kernel_maxrss_bytes`` (wait4's ru_maxrss) is the largest RSS of any single process
    of the tree, a cross-check for peaks the sampler might miss; it is at least the benchmark's own RSS,
    because the child starts as a fork of it, so it means nothing for small methods like ``copy``."""

    method: str
    repeat: int
    wall_s: float
    returncode: int
    peaks: TreePeaks
    kernel_maxrss_bytes: int
    out_bytes: int
    report: dict[str, Any] | None = None
    peak_disk_bytes: int | None = None
    stderr_tail: str = ""


def loractl_command(override: str | None) -> tuple[list[str], dict[str, str]]:
    """``loractl`` if installed, else ``python -m lora_cli`` with the repo root on PYTHONPATH."""
    if override:
        return shlex.split(override), {}
    exe = shutil.which("loractl")
    if exe:
        return [exe], {}
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return [sys.executable, "-m", "lora_cli"], {"PYTHONPATH": pythonpath}


def build_methods(
    base: Path, adapter: Path, devices: Sequence[str], args: argparse.Namespace, floor: Path | None = None
) -> list[Method]:
    """The copy floor copies `floor` (the bf16 base, the output's size, when the base merged is quantized)."""
    floor = floor or base
    methods = [Method("copy", lambda out: ["bash", "-c", 'cp -r -- "$0" "$1" && sync', str(floor), str(out)])]
    if not args.skip_loractl:
        cmd, env = loractl_command(args.loractl)
        for dev in devices:
            methods.append(
                Method(
                    f"loractl-{dev}",
                    lambda out, dev=dev: [
                        *cmd,
                        "merge",
                        str(base),
                        str(adapter),
                        str(out),
                        "--device",
                        dev,
                        "--json",
                        "--quiet",
                    ],
                    env=env,
                    parse_json=True,
                )
            )
    for label, command in (variant.split("=", 1) for variant in args.variant):
        # Another build of loractl side by side (an older commit, other thread counts), on the CPU.
        argv = shlex.split(command)
        methods.append(
            Method(
                f"loractl-{label}",
                lambda out, argv=argv: [
                    *argv,
                    "merge",
                    str(base),
                    str(adapter),
                    str(out),
                    "--device",
                    "cpu",
                    "--json",
                    "--quiet",
                ],
                parse_json=True,
            )
        )
    if not args.skip_peft:
        for dev in devices:
            methods.append(
                Method(
                    f"peft-{dev}",
                    lambda out, dev=dev: [
                        sys.executable,
                        "-m",
                        "lora_cli.peft_reference",
                        str(base),
                        str(adapter),
                        str(out),
                        "--dtype",
                        "bfloat16",
                        "--device",
                        dev,
                        "--sync",
                    ],
                    env={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), CHILD_ENV.get("PYTHONPATH")]))},
                    parse_json=True,
                )
            )
    return methods


def _flatten_stages(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """loractl's busy seconds per pipeline stage become `stage_read_s` etc., so the summary keeps them."""
    if report and isinstance(report.get("stage_seconds"), dict):
        report = {**report, **{f"stage_{k}_s": v for k, v in report["stage_seconds"].items()}}
    return report


def parse_json_report(text: str) -> dict[str, Any] | None:
    """The JSON object a method printed: the whole stdout, else the last line or block starting with "{" (or with
    the PEFT reference's RESULT prefix)."""
    text = "".join(line.removeprefix(RESULT_PREFIX) for line in text.splitlines(keepends=True))
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    lines = text.splitlines(keepends=True)
    starts = [sum(map(len, lines[:i])) for i, line in enumerate(lines) if line.startswith("{")]
    for start in reversed(starts):  # a pretty-printed object starts with "{" at column 0
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_measured(method: Method, out: Path, repeat: int, logs: Path, timeout: float | None) -> RunResult:
    """Run one method as a subprocess in its own session; time it and sample its tree's memory."""
    env = {**CHILD_ENV, **method.env}
    stdout_path = logs / f"{method.name}-{repeat}.out"
    stderr_path = logs / f"{method.name}-{repeat}.err"
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        start = time.perf_counter()
        for folder in method.disk:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        proc = subprocess.Popen(method.argv(out), stdout=so, stderr=se, env=env, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        disk = DiskSampler([*method.disk, out]) if method.disk else None
        if disk is not None:
            disk.start()
        try:
            status, rusage = _wait(proc, timeout)
        finally:
            wall = time.perf_counter() - start
            peaks = sampler.stop()
            peak_disk = disk.stop() if disk is not None else None
    returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = returncode
    stdout = stdout_path.read_text(errors="replace")
    stderr = stderr_path.read_text(errors="replace")
    return RunResult(
        method=method.name,
        repeat=repeat,
        wall_s=wall,
        returncode=returncode,
        peaks=peaks,
        kernel_maxrss_bytes=rusage.ru_maxrss * 1024,
        out_bytes=synthetic.checkpoint_bytes(out),
        report=_flatten_stages(parse_json_report(stdout)) if method.parse_json else None,
        peak_disk_bytes=peak_disk,
        stderr_tail="\n".join(stderr.strip().splitlines()[-15:]),
    )


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[int, Any]:
    """``os.wait4`` the child (its rusage gives the kernel's own max RSS); kill its group on timeout/^C."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                return status, rusage
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s")
            time.sleep(0.01)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        raise


# ----------------------------------------------------------------------------------------------------
# Correctness spot check (--check)
# ----------------------------------------------------------------------------------------------------


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for p in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), p))
    return where


def _load(where: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as f:
        return f.get_tensor(name).float()


def compare_outputs(base: Path, ours: Path, ref: Path, layers: int) -> dict[str, Any]:
    """Compare a sample of tensors of two merged outputs (ours vs PEFT's), one tensor at a time.

    Both are bf16, but PEFT rounds the delta to bf16 before adding it, so one or two bf16 ulps of
    difference are expected; the check passes when the worst difference is within 2 ulps of the largest
    weight and the merge really changed the weights.
    """
    wb, wo, wr = _tensor_files(base), _tensor_files(ours), _tensor_files(ref)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in sorted({0, layers // 2, layers - 1}):
        names += [f"model.layers.{i}.self_attn.{m}.weight" for m in synthetic.ATTN_MODULES]
        names += [f"model.layers.{i}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    missing = sorted(set(wr) ^ set(wo))
    worst = changed = 0.0
    ok = not missing
    for name in names:
        o, r, b = _load(wo, name), _load(wr, name), _load(wb, name)
        diff = (o - r).abs().max().item()
        worst = max(worst, diff)
        changed = max(changed, (o - b).abs().max().item())
        ok &= diff <= 2 * 2.0**-8 * r.abs().max().item() + 1e-12
    ok &= changed > 0
    return {
        "tensors_compared": len(names),
        "name_mismatches": missing[:10],
        "max_abs_diff": worst,
        "max_change_vs_base": changed,
        "pass": bool(ok),
    }


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    method: str
    wall_s: float
    ratio: float | None
    gb_per_s: float
    peak_anon_mib: float
    peak_file_mib: float
    peak_total_mib: float
    kernel_maxrss_mib: float
    runs: int
    failures: int
    self_report: dict[str, float] = field(default_factory=dict)
    peak_disk_mib: float | None = None


def summarize(results: list[RunResult], ckpt_bytes: int) -> list[Summary]:
    """Median wall time; worst (max) peak memory across repeats, so one lucky sample cannot hide a peak."""
    names = list(dict.fromkeys(r.method for r in results))
    ok = {n: [r for r in results if r.method == n and r.returncode == 0] for n in names}
    floor = statistics.median(r.wall_s for r in ok["copy"]) if ok.get("copy") else None
    out = []
    for n in names:
        runs = ok[n]
        if not runs:
            out.append(
                Summary(
                    n, float("nan"), None, float("nan"), *(float("nan"),) * 4, 0, sum(r.method == n for r in results)
                )
            )
            continue
        wall = statistics.median(r.wall_s for r in runs)
        numeric_keys = {
            k
            for r in runs
            if r.report
            for k, v in r.report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self_report = {
            k: statistics.median(r.report[k] for r in runs if r.report and k in r.report) for k in sorted(numeric_keys)
        }
        out.append(
            Summary(
                method=n,
                wall_s=wall,
                ratio=wall / floor if floor else None,
                gb_per_s=ckpt_bytes / wall / 1e9,
                peak_anon_mib=max(r.peaks.anon for r in runs) / MiB,
                peak_file_mib=max(r.peaks.file for r in runs) / MiB,
                peak_total_mib=max(r.peaks.total for r in runs) / MiB,
                kernel_maxrss_mib=max(r.kernel_maxrss_bytes for r in runs) / MiB,
                runs=len(runs),
                failures=sum(r.method == n and r.returncode != 0 for r in results),
                self_report=self_report,
                peak_disk_mib=max(r.peak_disk_bytes for r in runs) / MiB if runs[0].peak_disk_bytes else None,
            )
        )
    return out


def evaluate_targets(summaries: list[Summary], size: str) -> list[dict[str, Any]]:
    """The README targets, for every loractl method measured: speed vs copy floor and peak anon RSS."""
    limit = ANON_TARGET_BYTES[size] / MiB
    targets = []
    for s in summaries:
        if not s.method.startswith("loractl"):
            continue
        ratio_ok = s.ratio is not None and s.ratio <= RATIO_TARGET
        targets.append(
            {
                "target": f"{s.method} wall <= {RATIO_TARGET}x copy floor",
                "value": f"{s.ratio:.2f}x" if s.ratio is not None else "n/a",
                "pass": ratio_ok,
            }
        )
        targets.append(
            {
                "target": f"{s.method} peak anon RSS < {limit:.0f} MiB",
                "value": f"{s.peak_anon_mib:.0f} MiB",
                "pass": s.peak_anon_mib < limit,
            }
        )
    return targets


def format_table(summaries: list[Summary], markdown: bool) -> str:
    header = ["method", "wall s (median)", "x copy floor", "GB/s", "peak anon RSS MiB", "peak file RSS MiB"]
    header.append("peak disk MiB")
    rows = [
        [
            s.method,
            f"{s.wall_s:.2f}",
            f"{s.ratio:.2f}" if s.ratio is not None else "n/a",
            _fmt_rate(s.gb_per_s),
            f"{s.peak_anon_mib:.0f}",
            f"{s.peak_file_mib:.0f}",
            f"{s.peak_disk_mib:.0f}" if s.peak_disk_mib is not None else "",
        ]
        + ([f"({s.failures} failed)"] if s.failures else [])
        for s in summaries
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r[: len(header)]) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(r[: len(header)]) + ("  " + " ".join(r[len(header) :]) if len(r) > len(header) else "") for r in rows]
    return "\n".join(lines)


def print_report(
    info: dict[str, Any],
    summaries: list[Summary],
    targets: list[dict[str, Any]],
    check: dict[str, Any] | None,
    markdown: bool,
) -> None:
    gpu = f", GPU {info['machine']['gpu']}" if info["machine"]["gpu"] else ""
    m = info["machine"]
    print(f"Machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['cpu']}{gpu}")
    c = info["checkpoint"]
    print(
        f"Checkpoint: {c['size']} x{c['layers_mult']} ({c['layers']} layers), {c['bytes'] / 1e9:.2f} GB bf16 "
        f"in {c['shards']} shards; adapter rank {c['rank']} on {len(synthetic.ALL_LINEAR)} modules/layer, "
        f"{c['adapter_bytes'] / 1e6:.0f} MB fp32; {info['repeats']} repeats, input cache {info['cache']}; "
        f"workdir on {info['workdir_fs'] or '?'}"
    )
    print()
    print(format_table(summaries, markdown))
    print()
    for s in summaries:
        if s.self_report:
            keys = (
                "seconds",
                "bytes_written",
                "peak_rss_anon_bytes",
                "peak_rss_file_bytes",
                "load_base_s",
                "load_adapter_s",
                "merge_s",
                "save_s",
                "sync_s",
                "stage_read_s",
                "stage_compute_s",
                "stage_write_s",
                "cuda_max_allocated_bytes",
            )
            shown = ", ".join(_fmt_self(k, s.self_report[k]) for k in keys if k in s.self_report)
            print(f"{s.method} self-report (median): {shown}")
    print()
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}")
    if check is not None:
        print(
            f"{'PASS' if check['pass'] else 'FAIL'}  loractl-cpu output matches peft-cpu: "
            f"max |diff| {check['max_abs_diff']:.3g} over {check['tensors_compared']} tensors "
            f"(merge changed weights by up to {check['max_change_vs_base']:.3g})"
        )


def _fmt_self(key: str, value: float) -> str:
    if key.startswith("bytes_"):
        return f"{key.removeprefix('bytes_')} {value / 1e9:.2f} GB"
    if key.endswith("_bytes"):
        return f"{key.removesuffix('_bytes')} {value / MiB:.0f} MiB"
    return f"{key} {value:.2f}"


def _fmt_rate(gb_per_s: float) -> str:
    """Two decimals, but keep three significant digits for the tiny shape's small rates."""
    return f"{gb_per_s:.2f}" if gb_per_s >= 0.1 else f"{gb_per_s:.3g}"


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(synthetic.SHAPES), default="1b", help="model shape (default 1b)")
    p.add_argument("--layers-mult", type=int, default=1, help="multiply the number of layers (memory must not grow)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method; the median wall time is reported")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "both"),
        default=None,
        help="which merge devices to bench (default: both if CUDA is available, else cpu)",
    )
    p.add_argument("--skip-peft", action="store_true", help="do not run the transformers + PEFT baseline")
    p.add_argument("--skip-loractl", action="store_true", help="do not run loractl (test the harness alone)")
    p.add_argument("--loractl", metavar="CMD", help="command for loractl (default: loractl or python -m lora_cli)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="also time CMD (e.g. env PYTHONPATH=old python3 -m lora_cli) as loractl on the CPU, as loractl-NAME",
    )
    p.add_argument("--workdir", type=Path, help="where to build checkpoints and outputs (reused if it holds them)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and adapter afterwards")
    p.add_argument("--cold", action="store_true", help="evict the input from the page cache before every run")
    p.add_argument("--check", action="store_true", help="compare loractl-cpu's output with peft-cpu's (last repeat)")
    p.add_argument("--shard-mb", type=int, default=1024, help="base checkpoint shard size in MiB (default 1024)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument(
        "--base-format",
        choices=("bf16", "nf4", "fp8"),
        default="bf16",
        help="merge into the base quantized this way (bitsandbytes NF4, FP8 128x128 blocks); the copy floor then "
        "copies the bf16 base, the output's size, and the PEFT baseline is skipped",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds before a single run is killed")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write all results as JSON to PATH")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target FAILs")
    p.add_argument("--hub", action="store_true", help="also merge from (and push to) a local fake Hub; see above")
    p.add_argument(
        "--hub-latency-ms", type=float, default=0.0, help="with --hub: the server waits this long before each file GET"
    )
    args = p.parse_args(argv)
    if args.layers_mult < 1 or args.repeats < 1:
        p.error("--layers-mult and --repeats must be >= 1")
    return args


def resolve_devices(requested: str | None) -> list[str]:
    cuda = torch.cuda.is_available()
    wanted = {"cpu": ["cpu"], "cuda": ["cuda"], "both": ["cpu", "cuda"], None: ["cpu", "cuda"] if cuda else ["cpu"]}
    devices = wanted[requested]
    if "cuda" in devices and not cuda:
        log("CUDA is not available: skipping the cuda methods")
        devices = [d for d in devices if d != "cuda"]
    return devices


def check_space(workdir: Path, shape: synthetic.LlamaShape, rank: int, outputs: int) -> None:
    """Fail early if base + adapter + ``outputs`` merged copies will not fit (existing files count as free)."""
    base_bytes = sum(s.nbytes for s in synthetic.llama_tensor_specs(shape))
    adapter_bytes = sum(s.nbytes for s in synthetic.lora_tensor_specs(shape, rank, synthetic.ALL_LINEAR))
    existing = sum(p.stat().st_size for p in files_under(workdir))
    need = int((base_bytes * (1 + outputs) + adapter_bytes) * SPACE_MARGIN) - existing
    free = shutil.disk_usage(workdir).free
    if need > free:
        raise SystemExit(f"bench_merge: need ~{need / 1e9:.1f} GB free in {workdir}, have {free / 1e9:.1f} GB")


def build_inputs(workdir: Path, size: str, shape: synthetic.LlamaShape, args: argparse.Namespace) -> tuple[Path, Path]:
    """Build (or reuse) the synthetic base checkpoint and adapter; log how long it took."""
    tag = f"{size}-x{args.layers_mult}"
    t = time.perf_counter()
    base = synthetic.write_llama_checkpoint(
        workdir / f"llama-{tag}", shape, shard_bytes=args.shard_mb * MiB, progress=log
    )
    adapter = synthetic.write_lora_adapter(
        workdir / f"lora-{tag}-r{args.rank}", shape, rank=args.rank, alpha=2 * args.rank, base_model=str(base)
    )
    log(f"inputs ready in {time.perf_counter() - t:.1f} s: {base}, {adapter}")
    return base, adapter


def quantized_base(workdir: Path, base: Path, args: argparse.Namespace) -> Path:
    """--base-format nf4|fp8: the synthetic base quantized (loractl then writes it dequantized, bf16)."""
    t = time.perf_counter()
    quantized = synthetic.write_quantized_copy(base, workdir / f"{base.name}-{args.base_format}", args.base_format, log)
    log(f"{args.base_format} base ready in {time.perf_counter() - t:.1f} s: {quantized}")
    return quantized


def check_peft_diagnostics(result: RunResult, shape: synthetic.LlamaShape) -> None:
    """Warn loudly if transformers/PEFT did not load every tensor and LoRA module of the synthetic inputs."""
    rep = result.report or {}
    expected = shape.layers * len(synthetic.ALL_LINEAR)
    problems = []
    if rep.get("base_loading_info"):
        problems.append(f"base checkpoint load info: {rep['base_loading_info']}")
    if rep.get("lora_modules") != expected:
        problems.append(f"PEFT found {rep.get('lora_modules')} LoRA modules, expected {expected}")
    problems += [w for w in rep.get("warnings", []) if any(s in w.lower() for s in ("missing", "unexpected"))]
    for msg in problems:
        log(f"WARNING ({result.method}): {msg}")
    if not problems and result.repeat == 0:
        log(f"{result.method}: transformers loaded all tensors, PEFT found all {expected} LoRA modules")


def run_all(
    methods: list[Method],
    base: Path,
    adapter: Path,
    workdir: Path,
    shape: synthetic.LlamaShape,
    args: argparse.Namespace,
) -> tuple[list[RunResult], dict[str, Any] | None]:
    """Run every method once per repeat, rotating the order each repeat; optionally --check the last one."""
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    results: list[RunResult] = []
    check = None
    names = [m.name for m in methods]
    do_check = args.check and "loractl-cpu" in names and "peft-cpu" in names
    if args.check and not do_check:
        log("--check needs both loractl-cpu and peft-cpu; skipping it")
    if not args.cold:
        warm_cache(base)
        warm_cache(adapter)
    for rep in range(args.repeats):
        order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
        keep = {"loractl-cpu", "peft-cpu"} if do_check and rep == args.repeats - 1 else set()
        for m in order:
            out = workdir / f"out-{m.name}"
            remove_output(out)
            os.sync()  # start every run with no dirty pages of anyone else's to write back
            if args.cold:
                drop_cache(base)
                drop_cache(adapter)
            r = run_measured(m, out, rep, logs, args.timeout)
            results.append(r)
            status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode}"
            log(
                f"repeat {rep + 1}/{args.repeats} {m.name}: {r.wall_s:.2f} s, anon {r.peaks.anon / MiB:.0f} MiB, "
                f"file {r.peaks.file / MiB:.0f} MiB, out {r.out_bytes / 1e9:.2f} GB, {status}"
            )
            if r.returncode != 0:
                log(f"{m.name} stderr:\n{r.stderr_tail}")
            elif m.name.startswith("peft"):
                check_peft_diagnostics(r, shape)
            if m.name not in keep:
                remove_output(out)
        if keep:
            if all(r.returncode == 0 for r in results[-len(methods) :]):
                check = compare_outputs(base, workdir / "out-loractl-cpu", workdir / "out-peft-cpu", shape.layers)
            for name in keep:
                remove_output(workdir / f"out-{name}")
    return results, check


def cleanup(workdir: Path, created: bool, base: Path | None, adapter: Path | None, keep: bool) -> None:
    """Remove outputs and logs; the inputs too unless --keep; the workdir itself if we created it."""
    for p in workdir.glob("out-*"):
        remove_output(p)
    shutil.rmtree(workdir / "logs", ignore_errors=True)
    if keep:
        log(f"kept the inputs in {workdir} (pass --workdir {workdir} to reuse them)")
        return
    for d in (base, adapter):
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
            (d.parent / f"{d.name}.synthetic.json").unlink(missing_ok=True)
    if created:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = synthetic.SHAPES[args.size].with_layers_mult(args.layers_mult)
    devices = resolve_devices(args.device)
    created = args.workdir is None or not args.workdir.exists()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge-", dir=default_workdir_parent()))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    log(f"workdir {workdir} ({fs_type(workdir) or 'unknown fs'})")
    base = adapter = hub = floor = None
    try:
        check_space(workdir, shape, args.rank, outputs=2 if args.check else 1)
        base, adapter = build_inputs(workdir, args.size, shape, args)
        if args.base_format != "bf16":
            if not (args.skip_peft and not args.check):
                log(f"--base-format {args.base_format}: no PEFT baseline or --check (PEFT merges into bnb on GPU)")
            args.skip_peft, args.check = True, False
            floor, base = base, quantized_base(workdir, base, args)
        methods = build_methods(base, adapter, devices, args, floor)
        if args.hub:
            hub = start_fake_hub(base, args.hub_latency_ms)
            methods += hub_methods(hub.url, adapter, workdir, args)
        results, check = run_all(methods, base, adapter, workdir, shape, args)
        ckpt_bytes = synthetic.checkpoint_bytes(floor or base)
        summaries = summarize(results, ckpt_bytes)
        targets = evaluate_targets(summaries, args.size)
        info = {
            "machine": machine_info(),
            "checkpoint": {
                "size": args.size,
                "layers_mult": args.layers_mult,
                "layers": shape.layers,
                "bytes": ckpt_bytes,
                "shards": len(list(base.glob("*.safetensors"))),
                "rank": args.rank,
                "base_format": args.base_format,
                "quantized_bytes": synthetic.checkpoint_bytes(base) if floor else None,
                "adapter_bytes": synthetic.checkpoint_bytes(adapter),
            },
            "repeats": args.repeats,
            "cache": "cold" if args.cold else "warm",
            "workdir_fs": fs_type(workdir),
        }
        print_report(info, summaries, targets, check, args.markdown)
        if args.json:
            payload = {
                **info,
                "summary": [asdict(s) for s in summaries],
                "targets": targets,
                "check": check,
                "runs": [asdict(r) for r in results],
            }
            args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
    finally:
        if hub is not None:
            hub.stop()
        for folder in ("hf-home", "push-tmp"):
            shutil.rmtree(workdir / folder, ignore_errors=True)
        cleanup(workdir, created, base, adapter, args.keep)
        if floor is not None:
            cleanup(workdir, created, floor, None, args.keep)
    if any(r.returncode != 0 for r in results):
        return 2
    failed = any(not t["pass"] for t in targets) or (check is not None and not check["pass"])
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
