"""Where does a streamed merge's read time go: the fake Hub (tests/hub_server.py) or loractl's remote reader?

Serves the synthetic base (the one ``bench_merge.py --hub`` merges) from the fake Hub in a child process, so that
server and client do not share a GIL, and reads the same bytes of its first shard several ways:

- ``raw-1``: plain ``httpx`` on one keep-alive connection, large range requests one after another (the server's
  own speed for big reads, with no loractl code in the way);
- ``raw-N``: the same ranges, N requests in flight on N connections;
- ``raw-small``: one small range request per call (a norm's 4 KB), to show what each request costs the server;
- ``loractl``: loractl's reader as a merge drives it: each tensor's bytes in file order, through
  ``RemoteShard.read_into`` (one request per tensor, nothing in flight ahead), then the same tensors through
  ``RemoteReadAhead`` (the read-ahead the engine uses: blocks fetched several at a time, a bounded window ahead).

Examples::

    python scripts/bench_hub_reads.py --size 1b --mb 1024          # the first GiB of the 1.1B base
    python scripts/bench_hub_reads.py --size tiny --mb 8 --json reads.json
    python scripts/bench_hub_reads.py --size 1b --latency-ms 50    # each request waits 50 ms, as a far Hub would
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
MiB = 1 << 20
REPO = "bench/base"


def log(msg: str) -> None:
    print(f"[reads] {msg}", file=sys.stderr, flush=True)


def serve(base: Path, latency_ms: float) -> None:
    """Child process: the fake Hub serving `base` as bench/base; prints its URL, serves until stdin closes."""
    from tests.hub_server import FakeHub

    hub = FakeHub()
    hub.latency_s = latency_ms / 1000
    hub.add_repo(REPO, {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()})
    hub.start()
    print(hub.url, flush=True)
    sys.stdin.read()
    hub.stop()


def first_shard(base: Path) -> Path:
    return sorted(base.glob("*.safetensors"))[0]


def ranges_of(total: int, start: int, size: int) -> list[tuple[int, int]]:
    return [(offset, min(size, start + total - offset)) for offset in range(start, start + total, size)]


def timed(name: str, nbytes: int, requests: int, run) -> dict[str, object]:
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    row = {
        "method": name,
        "bytes": nbytes,
        "requests": requests,
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / seconds / 1e6, 1),
        "ms_per_request": round(1000 * seconds / max(requests, 1), 2),
    }
    log(f"{name}: {nbytes / 1e6:.0f} MB in {seconds:.2f} s = {row['mb_per_s']} MB/s, {requests} requests")
    return row


def raw_reads(url: str, spans: list[tuple[int, int]], connections: int) -> None:
    """GET each span with plain httpx (the client huggingface_hub 2.x wraps), `connections` at a time."""
    import httpx2 as httpx

    def worker(mine: list[tuple[int, int]]) -> None:
        with httpx.Client(timeout=60) as client:
            for offset, nbytes in mine:
                buffer = bytearray(nbytes)
                done = 0
                headers = {"Range": f"bytes={offset}-{offset + nbytes - 1}"}
                with client.stream("GET", url, headers=headers) as response:
                    assert response.status_code == 206, response.status_code
                    for piece in response.iter_bytes():
                        buffer[done : done + len(piece)] = piece
                        done += len(piece)
                assert done == nbytes, (done, nbytes)

    threads = [threading.Thread(target=worker, args=(spans[k::connections],)) for k in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=["tiny", "1b"], default="1b", help="synthetic base shape (default 1b)")
    p.add_argument("--workdir", type=Path, help="where the synthetic base is built (reused; bench_merge's too)")
    p.add_argument("--mb", type=int, default=512, help="MiB of the first shard read by each method (default 512)")
    p.add_argument("--range-mb", type=int, default=16, help="size of each raw range request in MiB (default 16)")
    p.add_argument("--parallel", type=int, default=4, help="connections for raw-N (default 4)")
    p.add_argument("--small", type=int, default=50, help="small range requests for raw-small (default 50)")
    p.add_argument(
        "--latency-ms", type=float, default=0.0, help="the server waits this long before each file GET (a far Hub)"
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.latency_ms)
        return 0

    import synthetic

    workdir = args.workdir or Path(tempfile.gettempdir()) / "bench_hub_reads"
    workdir.mkdir(parents=True, exist_ok=True)
    shape = synthetic.SHAPES[args.size]
    base = synthetic.write_llama_checkpoint(workdir / f"llama-{args.size}-x1", shape, shard_bytes=1024 * MiB)
    shard = first_shard(base)
    home = Path(tempfile.mkdtemp(prefix="hf-home-", dir=workdir))
    serve_argv = [sys.executable, __file__, "--serve", str(base), "--latency-ms", str(args.latency_ms)]
    child = subprocess.Popen(serve_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = child.stdout.readline().strip()
        log(f"fake Hub at {url} (pid {child.pid}) serving {base}")
        # huggingface_hub reads these at import: set before lora_cli's reader imports it.
        os.environ |= {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}
        os.environ.pop("HF_TOKEN", None)
        rows = measure(url, shard, args)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("| method | MB read | requests | seconds | MB/s | ms/request |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['method']} | {row['bytes'] / 1e6:.0f} | {row['requests']} | {row['seconds']} | "
            f"{row['mb_per_s']} | {row['ms_per_request']} |"
        )
    return 0


def measure(url: str, shard: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from lora_cli.io import remote
    from lora_cli.io.safetensors_file import read_header

    file_url = f"{url}/{REPO}/resolve/main/{shard.name}"
    meta = get_hf_file_metadata(hf_hub_url(REPO, shard.name, revision="main", endpoint=url))
    assert meta.commit_hash is not None and meta.size is not None
    with read_header(shard) as local:
        tensors = list(local.tensors.values())
    budget = min(args.mb * MiB, meta.size)
    chosen, total = [], 0
    for info in tensors:
        if total >= budget:
            break
        chosen.append(info)
        total += info.nbytes
    start = chosen[0].offset
    spans = ranges_of(total, start, args.range_mb * MiB)
    rows = [
        timed("raw-1", total, len(spans), lambda: raw_reads(file_url, spans, 1)),
        timed(f"raw-{args.parallel}", total, len(spans), lambda: raw_reads(file_url, spans, args.parallel)),
    ]
    small = [(start + k * 4096, 4096) for k in range(args.small)]
    rows.append(timed("raw-small (4 KB)", 4096 * len(small), len(small), lambda: raw_reads(file_url, small, 1)))

    path = Path(tempfile.gettempdir()) / "bench-hub-reads" / shard.name  # the key readers look shards up by
    shard_reader = remote.RemoteShard(path, REPO, shard.name, meta.commit_hash, meta.size)

    def per_tensor() -> None:
        for info in chosen:
            shard_reader.read_into(memoryview(bytearray(info.nbytes)), info.offset)

    before = shard_reader.requests
    rows.append(timed("loractl, one request per tensor", total, 0, per_tensor))
    rows[-1]["requests"] = shard_reader.requests - before
    rows[-1]["ms_per_request"] = round(1000 * rows[-1]["seconds"] / max(rows[-1]["requests"], 1), 2)

    if hasattr(remote, "RemoteReadAhead"):

        def read_ahead() -> None:
            ahead = remote.RemoteReadAhead([(shard_reader, info.offset, info.nbytes) for info in chosen])
            try:
                for info in chosen:
                    shard_reader.read_into(memoryview(bytearray(info.nbytes)), info.offset)
            finally:
                ahead.close()

        before = shard_reader.requests
        rows.append(timed("loractl, read-ahead", total, 0, read_ahead))
        rows[-1]["requests"] = shard_reader.requests - before
        rows[-1]["ms_per_request"] = round(1000 * rows[-1]["seconds"] / max(rows[-1]["requests"], 1), 2)
    return rows


if __name__ == "__main__":
    sys.exit(main())
