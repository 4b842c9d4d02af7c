"""The recorder on a real full disk (a small tmpfs mounted for the test, as root): forwarding goes on, the
failure is counted, no .part file is left, recording resumes once space is back, and the summary says so."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support.proxy import run_proxy_process
from tests.support.system import require_root, unavailable
from tests.unit.test_capture_sink import epb_comments


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted on a fresh directory; unmounted at teardown."""
    require_root("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {r.stderr.decode().strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_enospc_stops_recording_keeps_forwarding_and_resumes(small_disk, secantus, db_name):
    rec = small_disk / "rec"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 256 * 1024))  # 256 KiB left
    with run_proxy_process(["--record", str(rec)], upstream=secantus.address) as p:
        with p.client() as client:
            coll = client[db_name].c
            for i in range(100):  # 1 MB of documents through the proxy: more than the disk has
                coll.insert_one({"_id": i, "pad": "x" * 10_000})
            assert coll.count_documents({}) == 100  # forwarding never noticed
            _wait(
                lambda: (p.metric("mongoproxy_capture_disk_errors_total", reason="enospc") or 0) >= 1,
                "the ENOSPC counted",
            )
            assert p.metric("mongoproxy_capture_dropped_total") >= 1
            assert not [n for n in os.listdir(rec) if n.endswith(".part")], os.listdir(rec)
        filler.unlink()
        time.sleep(11)  # the recorder's pause after a disk failure (DISK_RETRY_SECONDS)
        with p.client() as client:
            client[db_name].command("ping")
            assert client[db_name].c.find_one({"_id": 7})["pad"] == "x" * 10_000
        _wait(lambda: any(n.endswith(".part") for n in os.listdir(rec)), "recording resumed")
        p.send_signal(15)
        assert p.wait(30) == 0
        text = p.stderr_text()
    names = sorted(os.listdir(rec))
    assert names and not [n for n in names if n.endswith(".part")], names
    for n in names:
        assert os.stat(rec / n).st_mode & 0o777 == 0o600
    summaries = " ".join(t for n in names for i, t in epb_comments(str(rec / n)) if i < 0)
    assert "disk error(s) stopped the recording" in summaries
    assert "connection(s) were not recorded or were cut short" in summaries
    assert "was deleted" in text
