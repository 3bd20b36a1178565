"""RemoteReadAhead (lora_cli/io/remote.py): the byte ranges a streamed merge will read, fetched from the fake Hub
ahead of their readers in blocks, several at once, within a bounded window; the same bytes as one request per range."""

from __future__ import annotations

import os
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from lora_cli.errors import InputError
from lora_cli.io import remote
from tests.hub_server import FakeHub, point_client_at

NAME = "model.safetensors"
CONTENT = os.urandom(300_000)  # read by range only: it need not parse as safetensors here
BLOCK, WINDOW = 16_384, 65_536


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server = FakeHub()
    server.start()
    point_client_at(server, tmp_path / "hf", monkeypatch)
    monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.0)
    server.commit = server.add_repo("org/base", {NAME: CONTENT})["main"]
    try:
        yield server
    finally:
        server.stop()


def shard_on(hub: FakeHub, tmp_path: Path) -> remote.RemoteShard:
    return remote.RemoteShard(tmp_path / NAME, "org/base", NAME, hub.commit, len(CONTENT))


def spans(hub: FakeHub) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in r.headers["range"][6:].split("-")) for r in hub.file_gets(NAME)]


def resolves(hub: FakeHub) -> int:
    return sum(r.method == "HEAD" and "/resolve/" in r.path for r in hub.requests)


def small_and_large(start: int = 1000) -> list[tuple[int, int]]:
    """200 adjacent 500-byte ranges (norms), then one of 150,000 bytes (a weight), back to back."""
    ranges = [(start + 500 * k, 500) for k in range(200)]
    return [*ranges, (start + 100_000, 150_000)]


def read_all(shard: remote.RemoteShard, ranges: list[tuple[int, int]]) -> list[bytes]:
    out = []
    for offset, nbytes in ranges:
        view = memoryview(bytearray(nbytes))
        shard.read_into(view, offset)
        out.append(bytes(view))
    return out


def test_adjacent_ranges_share_blocks_and_every_byte_arrives_once(hub, tmp_path):
    shard, ranges = shard_on(hub, tmp_path), small_and_large()
    with remote.RemoteReadAhead([(shard, o, n) for o, n in ranges], window=WINDOW, block=BLOCK) as ahead:
        got = read_all(shard, ranges)
        assert ahead._held == 0  # every block consumed, so dropped
    assert got == [CONTENT[o : o + n] for o, n in ranges]
    # 201 ranges over 250,000 adjacent bytes: 17 requests, not 201 (the norms 32 to a block, the weight in blocks
    # of its own: 7 + 10); together they cover the bytes exactly.
    asked = sorted(spans(hub))
    assert len(asked) == -(-200 // (BLOCK // 500)) + -(-150_000 // BLOCK) == 17
    assert (101_000, 101_000 + BLOCK - 1) in asked  # the weight's first block starts where the weight does
    assert asked[0][0] == 1000 and asked[-1][1] == 251_000 - 1
    assert all(b[0] == a[1] + 1 for a, b in pairwise(asked))


def test_fetching_starts_before_the_reader_and_stops_at_the_window(hub, tmp_path):
    shard, ranges = shard_on(hub, tmp_path), small_and_large()
    held = []
    submit = remote.RemoteReadAhead._submit

    def recording(self, block):
        submit(self, block)
        held.append(self._held)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remote.RemoteReadAhead, "_submit", recording)
        with remote.RemoteReadAhead([(shard, o, n) for o, n in ranges], window=WINDOW, block=BLOCK):
            deadline = time.monotonic() + 5
            while len(hub.file_gets(NAME)) < WINDOW // BLOCK and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # nothing more may come while nobody reads
            assert len(hub.file_gets(NAME)) == WINDOW // BLOCK
            got = read_all(shard, ranges)
    assert got == [CONTENT[o : o + n] for o, n in ranges]
    assert max(held) <= WINDOW  # one reader, in plan order: never past the window


def test_two_readers_interleaved_get_their_bytes(hub, tmp_path):
    """As in the engine: the read stage takes the edited tensors, the write stage the copied runs, in parallel."""
    shard, ranges = shard_on(hub, tmp_path), small_and_large()
    results: dict[int, bytes] = {}

    def reader(mine: list[int]) -> None:
        for k in mine:
            offset, nbytes = ranges[k]
            view = memoryview(bytearray(nbytes))
            shard.read_into(view, offset)
            results[k] = bytes(view)

    with remote.RemoteReadAhead([(shard, o, n) for o, n in ranges], window=WINDOW, block=BLOCK) as ahead:
        threads = [threading.Thread(target=reader, args=(list(range(k, len(ranges), 2)),)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert ahead._held == 0
    assert [results[k] for k in range(len(ranges))] == [CONTENT[o : o + n] for o, n in ranges]


def test_bytes_outside_the_plan_or_read_twice_come_from_the_network(hub, tmp_path):
    shard = shard_on(hub, tmp_path)
    with remote.RemoteReadAhead([(shard, 10_000, 40_000)], window=WINDOW, block=BLOCK):
        assert shard.read(0, 20_000) == CONTENT[:20_000]  # straddles the plan's start
        assert shard.read(10_000, 40_000) == CONTENT[10_000:50_000]
        assert shard.read(30_000, 30_000) == CONTENT[30_000:60_000]  # consumed already, and past the plan's end
    assert shard._ahead is None  # closed: reads go to the network again
    assert shard.read(299_000, 1000) == CONTENT[299_000:]


def test_a_dropped_block_is_resumed_from_the_byte_it_stopped_at(hub, tmp_path):
    shard = shard_on(hub, tmp_path)
    hub.interrupt("org/base", NAME, [5000])
    with remote.RemoteReadAhead([(shard, 0, 100_000)], window=WINDOW, block=BLOCK, requests=1):
        assert shard.read(0, 100_000) == CONTENT[:100_000]
    asked = spans(hub)
    assert asked[0] == (0, BLOCK - 1) and asked.count((5000, BLOCK - 1)) == 1, asked


def test_a_connection_that_keeps_dropping_reaches_the_reader_naming_the_file(hub, tmp_path):
    shard = shard_on(hub, tmp_path)
    hub.interrupt("org/base", NAME, [100] + [0] * 40)
    with remote.RemoteReadAhead([(shard, 0, 100_000)], window=WINDOW, block=BLOCK), pytest.raises(InputError) as err:
        shard.read(0, 100_000)
    assert "kept dropping" in str(err.value) and NAME in str(err.value.path)


def test_a_resolved_storage_link_is_reused_and_resolved_again_when_it_expires(hub, tmp_path):
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    hub.cdn_links = True
    meta = get_hf_file_metadata(hf_hub_url("org/base", NAME, revision=hub.commit, endpoint=constants.ENDPOINT))
    assert "/lfs-cdn/" in meta.location
    shard = remote.RemoteShard(tmp_path / NAME, "org/base", NAME, hub.commit, len(CONTENT), meta.location)
    assert shard.read(0, 50_000) == CONTENT[:50_000]
    assert not hub.file_gets(NAME) and len(hub.cdn_gets()) == 1  # no resolve per range: the link itself
    hub.expire_links()
    assert resolves(hub) == 1
    assert shard.read(50_000, 50_000) == CONTENT[50_000:100_000]
    assert resolves(hub) == 2  # refused (403): resolved again, once, and read from the new link
    assert shard.read(100_000, 1000) == CONTENT[100_000:101_000]
    assert resolves(hub) == 2 and not hub.file_gets(NAME)


def test_a_link_refused_even_after_resolving_again_falls_back_to_the_resolve_url(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    hub.cdn_links = True
    meta = get_hf_file_metadata(hf_hub_url("org/base", NAME, revision=hub.commit, endpoint=constants.ENDPOINT))
    shard = remote.RemoteShard(tmp_path / NAME, "org/base", NAME, hub.commit, len(CONTENT), meta.location)
    hub.expire_links()
    monkeypatch.setattr(remote.RemoteShard, "_relocate", lambda self: False)  # resolving again gave the same link
    assert shard.read(1000, 20_000) == CONTENT[1000:21_000]
    assert shard.location is None and len(hub.file_gets(NAME)) == 1  # through resolve, its redirect followed


def test_a_reader_ahead_of_the_window_gets_its_blocks_in_parallel(hub, tmp_path):
    """The read stage runs ahead of the write stage; the blocks it asks for itself come several at a time."""
    shard = shard_on(hub, tmp_path)
    hub.latency_s = 0.3  # each GET waits, so that requests made in parallel are seen waiting together
    with remote.RemoteReadAhead([(shard, 0, 8 * BLOCK), (shard, 8 * BLOCK, 8 * BLOCK)], window=BLOCK, block=BLOCK):
        assert shard.read(8 * BLOCK, 8 * BLOCK) == CONTENT[8 * BLOCK : 16 * BLOCK]  # past the one-block window
        assert shard.read(0, 8 * BLOCK) == CONTENT[: 8 * BLOCK]
    assert hub.most_in_flight >= 2  # one request after another (requests=1) gives 1


def test_the_same_bytes_planned_twice_and_read_at_once_stay_right(hub, tmp_path):
    """A tied weight can be read by two stages at once: a block's buffer is reused only when no read holds it."""
    shard = shard_on(hub, tmp_path)
    size = 6 * BLOCK
    for _ in range(3):
        results: list[bytes] = []

        def reader(results: list[bytes] = results) -> None:
            results.append(shard.read(0, size))

        planned = [(shard, 0, size), (shard, 0, size), (shard, size, size)]
        with remote.RemoteReadAhead(planned, window=2 * BLOCK, block=BLOCK) as ahead:
            threads = [threading.Thread(target=reader) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert shard.read(size, size) == CONTENT[size : 2 * size]  # on through reused buffers
            assert ahead._held == 0
        assert results == [CONTENT[:size]] * 2
