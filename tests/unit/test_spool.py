"""app.spool: ordered, bounded, crash-safe JSONL spool."""

from __future__ import annotations

import json
from pathlib import Path

from app.spool import Spool


def _lines(start: int, count: int) -> list[str]:
    return [json.dumps({"i": i}) for i in range(start, start + count)]


def _drain(spool: Spool, chunk: int = 3) -> list[str]:
    out: list[str] = []
    while lines := spool.peek(chunk):
        out += lines
        spool.commit(len(lines))
    return out


def test_replays_in_order_across_segments_and_deletes_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=100, segment_records=4)
    spool.append(_lines(0, 6))
    spool.append(_lines(6, 5))
    assert len(spool) == 11 and spool.segments == 3
    assert _drain(spool) == _lines(0, 11)
    assert len(spool) == 0 and not list(tmp_path.glob("seg-*"))


def test_bound_drops_the_excess_and_reports_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=5, segment_records=2)
    assert spool.append(_lines(0, 3)) == 3
    assert spool.append(_lines(3, 4)) == 2  # only 2 fit; the caller counts the other 2
    assert not spool.writable()
    assert _drain(spool) == _lines(0, 5)
    assert spool.writable()


def test_survives_a_restart_mid_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=100, segment_records=4)
    spool.append(_lines(0, 7))
    spool.commit(len(spool.peek(3)))  # 3 delivered before the "crash"
    reopened = Spool(tmp_path, max_records=100, segment_records=4)
    assert len(reopened) == 4
    assert _drain(reopened) == _lines(3, 4)


def test_torn_last_line_is_dropped_on_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=100, segment_records=10)
    spool.append(_lines(0, 2))
    segment = next(tmp_path.glob("seg-*"))
    with segment.open("a") as handle:
        handle.write('{"i": 2')  # a crash in the middle of a write
    reopened = Spool(tmp_path, max_records=100, segment_records=10)
    assert _drain(reopened) == _lines(0, 2)


def test_appends_after_a_full_drain_keep_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=100, segment_records=3)
    spool.append(_lines(0, 2))
    assert _drain(spool) == _lines(0, 2)
    spool.append(_lines(2, 4))
    assert _drain(spool, chunk=10) == _lines(2, 4)


def test_a_record_holding_unicode_line_separators_stays_one_record(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False), as pool records are written, leaves U+2028 and U+0085
    # raw; str.splitlines would cut the record there and shift every later one.
    records = [json.dumps({"t": "a\u2028b\x85c\u2029d"}, ensure_ascii=False), *_lines(0, 2)]
    spool = Spool(tmp_path, max_records=100, segment_records=10)
    spool.append(records)
    assert spool.peek(10) == records
    assert _drain(Spool(tmp_path, max_records=100, segment_records=10)) == records
