"""mongoproxy.reclaim: when a burst of closed connections triggers a reclaim, and what one does."""

import gc
import sys
import weakref

import pytest

from mongoproxy import reclaim


def test_reclaims_once_the_count_fell_by_a_burst_and_stopped_falling():
    r = reclaim.Reclaimer(after_closes=256, min_interval=10.0)
    assert r.check(2000, 100.0) is None  # the burst is open
    assert r.check(900, 102.0) is None  # still falling
    report = r.check(900, 104.0)  # fell by 1,100 and stopped
    assert report is not None and report["closed"] == 1100
    assert r.runs == 1 and r.high == 900


def test_small_drops_and_a_recent_reclaim_do_not_trigger_one():
    r = reclaim.Reclaimer(after_closes=256, min_interval=10.0)
    for t, n in enumerate((300, 100, 100, 350, 120, 120)):  # each drop stays under 256
        assert r.check(n, float(t)) is None
    assert r.check(600, 10.0) is None
    assert r.check(10, 12.0) is None  # falling
    assert r.check(10, 14.0) is not None
    assert r.check(400, 15.0) is None
    assert r.check(0, 17.0) is None  # falling
    assert r.check(0, 19.0) is None  # 5 s after the last reclaim: too soon
    assert r.check(0, 24.5) is not None
    assert r.runs == 2


class _Node:
    pass


def test_reclaim_runs_a_full_collection_and_reports_it():
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle only the collector frees
    ref = weakref.ref(a)
    del a, b
    gc.disable()
    try:
        report = reclaim.reclaim()
    finally:
        gc.enable()
    assert ref() is None
    assert report["collected"] >= 2
    assert report["gc_ms"] >= 0 and report["trim_ms"] >= 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim and /proc are Linux's")
def test_malloc_trim_and_rss_are_read_on_linux():
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert reclaim.malloc_trim is not None
    assert reclaim.rss_kb() > 0
