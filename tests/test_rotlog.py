"""Container log files: rotation keeps them bounded; tail and follow see across rotations."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from common.rotlog import RotatingWriter, follow, rotated_files, tail


def lines(start: int, count: int, width: int = 20) -> bytes:
    return b"".join(f"{i:06d} ".encode().ljust(width - 1, b"x") + b"\n" for i in range(start, start + count))


def sizes(path: Path) -> list[int]:
    return [os.path.getsize(f) for f in rotated_files(str(path))]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "app.log"


def test_rotation_keeps_at_most_max_files_of_max_size(log: Path) -> None:
    writer = RotatingWriter(str(log), max_size=1000, max_files=3)
    data = lines(0, 500)  # 10 000 bytes: several rotations
    for i in range(0, len(data), 333):
        writer.write(data[i : i + 333])
    writer.close()
    assert [os.path.basename(f) for f in rotated_files(str(log))] == ["app.log.2", "app.log.1", "app.log"]
    assert all(size <= 1000 for size in sizes(log))
    assert data.endswith(tail(str(log), None))


def test_rotation_falls_on_line_boundaries(log: Path) -> None:
    writer = RotatingWriter(str(log), max_size=1000, max_files=5)
    writer.write(lines(0, 120))
    writer.close()
    for name in rotated_files(str(log)):
        content = Path(name).read_bytes()
        assert content.endswith(b"\n") and len(content) % 20 == 0


def test_a_write_larger_than_max_size_is_split(log: Path) -> None:
    writer = RotatingWriter(str(log), max_size=100, max_files=2)
    writer.write(b"y" * 1000)  # no newline to cut at
    writer.close()
    assert sizes(log) == [100, 100]


def test_one_file_only_means_truncation(log: Path) -> None:
    writer = RotatingWriter(str(log), max_size=100, max_files=1)
    writer.write(lines(0, 12))
    writer.close()
    assert rotated_files(str(log)) == [str(log)]
    assert log.read_bytes() == lines(10, 2)


def test_reopening_appends_and_counts_the_existing_size(log: Path) -> None:
    log.write_bytes(b"z" * 90)
    writer = RotatingWriter(str(log), max_size=100, max_files=2)
    writer.write(b"0123456789abc\n")
    writer.close()
    assert Path(f"{log}.1").read_bytes() == b"z" * 90
    assert log.read_bytes() == b"0123456789abc\n"


def test_bad_limits_are_invalid(log: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        RotatingWriter(str(log), max_size=0, max_files=1)
    assert err.value.field == "max_size"


def test_tail_reads_across_rotated_files(log: Path) -> None:
    writer = RotatingWriter(str(log), max_size=100, max_files=4)
    writer.write(lines(0, 15))  # 5 lines per file: .log.2, .log.1, .log
    writer.close()
    assert tail(str(log), 7) == lines(8, 7)
    assert tail(str(log), 1) == lines(14, 1)
    assert tail(str(log), 0) == b""
    assert tail(str(log), 100) == lines(0, 15)
    assert tail(str(log), None) == lines(0, 15)


def test_tail_counts_an_unterminated_last_line(log: Path) -> None:
    log.write_bytes(b"a\nb\nc")
    assert tail(str(log), 2) == b"b\nc"
    assert tail(str(log), 1) == b"c"


def test_tail_of_a_missing_log_is_empty(log: Path) -> None:
    assert tail(str(log), 10) == b""
    assert tail(str(log), None) == b""


def test_tail_reads_past_one_block(log: Path) -> None:
    data = lines(0, 10_000, width=100)  # 1 MB: many 64 KiB blocks
    log.write_bytes(data)
    assert tail(str(log), 5_000) == lines(5_000, 5_000, width=100)


def test_follow_yields_only_new_data_and_survives_rotation(log: Path) -> None:
    writer = RotatingWriter(str(log), max_size=100, max_files=3)
    writer.write(b"before follow\n")
    stop = threading.Event()
    guard = threading.Timer(10, stop.set)  # a broken follow ends the test instead of hanging it
    guard.start()
    try:
        chunks = follow(str(log), stop, poll=0.01)
        writer.write(b"first\n")
        assert next(chunks) == b"first\n"
        expected = lines(0, 12)  # 240 bytes: two rotations, each drained before the next
        got = b""
        for block in (expected[:120], expected[120:]):
            writer.write(block)
            want = got + block
            while len(got) < len(want):
                got += next(chunks)
        assert got == expected
        stop.set()
        assert list(chunks) == []
    finally:
        guard.cancel()
        writer.close()


def test_follow_waits_for_the_file_to_appear(log: Path) -> None:
    stop = threading.Event()
    guard = threading.Timer(10, stop.set)
    guard.start()
    try:
        chunks = follow(str(log), stop, poll=0.01)
        log.write_bytes(b"hello\n")
        assert next(chunks) == b"hello\n"
    finally:
        stop.set()
        guard.cancel()
