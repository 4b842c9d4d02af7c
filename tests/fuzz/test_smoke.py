"""CI smoke: every harness seeds itself and runs under libFuzzer for a bounded time, without a crash.

Budget: 6 seconds (or 3,000 executions) per harness plus each child's start-up, meant to stay under 60 seconds
in all on an unloaded CI runner. On the shared development machine (load average about 10, nice 15) it took 76 s
with 8-second harnesses. The long runs are `python -m tests.fuzz --minutes N` (docs/hardening.md).
"""

from __future__ import annotations

import pytest

from tests.fuzz import seeds
from tests.fuzz.registry import HARNESSES

SMOKE_SECONDS = 6
SMOKE_RUNS = 3_000


@pytest.mark.parametrize("name", [n for n in HARNESSES if n != "hello"])
def test_harness_runs_without_crash(name, tmp_path):
    # Skipped at run time, not collection time, so MONGOPROXY_REQUIRE_SYSTEM=1 turns a missing atheris into a failure.
    pytest.importorskip("atheris", reason="fuzzing needs atheris: pip install -e '.[test]'")
    from tests.fuzz.__main__ import run_one

    out = run_one(name, SMOKE_SECONDS, SMOKE_RUNS, tmp_path / "corpus", tmp_path / "artifacts")
    assert out.status == "ok", f"{name}: {out.status}\n{out.log_tail}"
    assert out.runs >= len(seeds.SEEDS[name]()), f"{name}: only {out.runs} executions"


def test_hello_slot_is_reported_until_the_rewriter_exists():
    from tests.fuzz.__main__ import run_one

    out = run_one("hello", 1, 1, None, None)  # type: ignore[arg-type]
    assert out.status.startswith("not available") and out.runs == 0
