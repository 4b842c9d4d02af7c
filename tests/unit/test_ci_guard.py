"""The CI guard: under MONGOPROXY_REQUIRE_SYSTEM=1 a skip at collection time fails the run like any other skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.system import REPO_ROOT

MODULE_SKIP = """
import pytest
pytest.importorskip("mongoproxy_no_such_module_for_the_guard_test")

def test_never_runs():
    assert False
"""

PLAIN = """
def test_runs():
    assert 1 + 1 == 2
"""


def _pytest(tmp_path, source: str, required: bool) -> subprocess.CompletedProcess:
    tests = tmp_path / "tests"
    tests.mkdir()
    # The real conftest, loaded as a plugin: the tiny file lives outside the repository's tests/ directory.
    (tests / "test_tiny.py").write_text(source)
    (tests / "test_plain.py").write_text(PLAIN)  # so that a run without the guard has a test and exits 0
    env = {k: v for k, v in os.environ.items() if k != "MONGOPROXY_REQUIRE_SYSTEM"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if required:
        env["MONGOPROXY_REQUIRE_SYSTEM"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            str(tests),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("required", [False, True])
def test_module_level_importorskip(tmp_path, required):
    """A module-level importorskip is a skip normally and a failure under MONGOPROXY_REQUIRE_SYSTEM=1."""
    r = _pytest(tmp_path, MODULE_SKIP, required)
    out = r.stdout + r.stderr
    if required:
        assert r.returncode == 1, out
        assert "(collection)" in out and "mongoproxy_no_such_module_for_the_guard_test" in out, out
    else:
        assert r.returncode == 0, out
        assert "1 skipped" in out, out


def test_guard_passes_a_clean_run(tmp_path):
    """Nothing skipped: the guard leaves a passing run passing."""
    r = _pytest(tmp_path, PLAIN.replace("test_runs", "test_runs_too"), True)
    assert r.returncode == 0, r.stdout + r.stderr
