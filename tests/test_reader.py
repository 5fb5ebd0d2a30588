"""`StreamReader` against a real nats-server: a range of a stream in order, each message
once; the whole stream; a subject nothing matches."""

from __future__ import annotations

import pytest

from scf.bus.errors import StreamNotFound
from scf.bus.reader import StreamReader

pytestmark = pytest.mark.anyio


async def test_stream_reader_reads_a_range_in_order(bus):
    for i in range(1, 301):
        await bus.js.publish(f"job.progress.r{i % 3}", str(i).encode())
    seen: list[tuple[int, int]] = []
    reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.progress.r1", start_seq=10, end_seq=200)
    stats = await reader.scan(lambda data, seq: seen.append((int(data), seq)))
    want = [i for i in range(10, 201) if i % 3 == 1]
    assert [d for d, _ in seen] == want and [s for _, s in seen] == want
    assert (stats.messages, stats.passes, stats.last_seq) == (len(want), 1, want[-1])

    everything: list[int] = []
    await StreamReader(bus.nc, bus.js, "TRAINING", "job.>").scan(lambda d, s: everything.append(s))
    assert everything == list(range(1, 301))
    nothing: list[int] = []
    await StreamReader(bus.nc, bus.js, "TRAINING", "job.none").scan(lambda d, s: nothing.append(s))
    assert nothing == []


async def test_a_missing_stream_names_the_fix(bus):
    with pytest.raises(StreamNotFound, match="stream NOPE does not exist: run `scf streams ensure`"):
        await StreamReader(bus.nc, bus.js, "NOPE", "x.>").scan(lambda d, s: None)
