"""`python -m tests.fuzz`: run the atheris harnesses one after another and report executions and crashes.

    python -m tests.fuzz --minutes N [--harness NAME ...] [--runs N] [--corpus DIR] [--artifacts DIR]

Each harness runs in its own process for --minutes N (per harness), or until --runs executions, whichever
comes first. Its working corpus (DIR/NAME, default .fuzz/corpus/NAME, kept between runs) is seeded with
tests/fuzz/seeds.py; a crash or invariant violation is written to --artifacts (default .fuzz/artifacts)
as crash-*, to be turned into a regression test in tests/unit, and libFuzzer's progress to ARTIFACTS/NAME.log.
Exit status 1 when any harness crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.registry import HARNESSES

ROOT = Path(__file__).resolve().parents[2]
# Longest input per harness: a tracker program needs few bytes; capture files need more.
MAX_LEN = {"scanner": 4096, "tracker": 512, "replay": 8192}


@dataclass
class Outcome:
    """What one harness run did."""

    name: str
    runs: int = 0
    seconds: float = 0.0
    crashes: list | None = None
    status: str = "ok"
    log_tail: str = ""


def write_seeds(name: str, corpus: Path) -> int:
    """Write the harness's seeds into its corpus directory (named by content: idempotent); how many."""
    from tests.fuzz.seeds import SEEDS

    corpus.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[name]()
    for data in seeds:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    return len(seeds)


def available(name: str) -> bool:
    """False for a slot whose code under test does not exist yet (the hello rewriter)."""
    if name != "hello":
        return True
    from tests.fuzz import harness_hello

    return harness_hello.AVAILABLE


def run_one(name: str, seconds: float, runs: int, corpus_root: Path, artifacts_root: Path) -> Outcome:
    """Fuzz one harness in a child process; parse libFuzzer's final stats."""
    if not available(name):
        return Outcome(name, status="not available (no hello rewriter yet)")
    corpus = corpus_root / name
    artifacts = artifacts_root / name
    artifacts.mkdir(parents=True, exist_ok=True)
    write_seeds(name, corpus)
    before = set(artifacts.iterdir())
    cmd = [
        sys.executable,
        "-m",
        "tests.fuzz.child",
        name,
        f"-max_total_time={max(1, int(seconds))}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        "-rss_limit_mb=2048",
        "-timeout=20",
        f"-max_len={MAX_LEN.get(name, 4096)}",
    ]
    if runs:
        cmd.append(f"-runs={runs}")
    cmd.append(str(corpus))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = artifacts_root / f"{name}.log"  # libFuzzer's progress lines (#N pulse/NEW ... exec/s), as they come
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    out = Outcome(name, seconds=time.monotonic() - t0)
    text = log_path.read_text(errors="replace")
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    if m:
        out.runs = int(m[-1])
    else:
        done = re.findall(r"Done (\d+) runs", text)
        out.runs = int(done[-1]) if done else 0
    # slow-unit-* files only say an input took long (on a busy machine, often just scheduling); not a failure.
    new = set(artifacts.iterdir()) - before
    out.crashes = sorted(str(p) for p in new if not p.name.startswith("slow-unit-"))
    if out.crashes or proc.returncode != 0:
        out.status = f"CRASH (exit {proc.returncode})"
        out.log_tail = text[-4000:]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the chosen harnesses; print one line each and a table."""
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="per harness")
    ap.add_argument("--runs", type=int, default=0, help="stop a harness after this many executions (0: no limit)")
    ap.add_argument("--harness", action="append", choices=sorted(HARNESSES), help="default: all")
    ap.add_argument("--corpus", type=Path, default=ROOT / ".fuzz" / "corpus")
    ap.add_argument("--artifacts", type=Path, default=ROOT / ".fuzz" / "artifacts")
    args = ap.parse_args(argv)
    results = []
    for name in args.harness or list(HARNESSES):
        print(f"fuzzing {name}: {HARNESSES[name][1]}", file=sys.stderr, flush=True)
        r = run_one(name, args.minutes * 60, args.runs, args.corpus, args.artifacts)
        results.append(r)
        rate = r.runs / r.seconds if r.seconds else 0
        print(f"  {name}: {r.runs} executions in {r.seconds:.0f} s ({rate:.0f}/s): {r.status}", file=sys.stderr)
        if r.log_tail:
            print(r.log_tail, file=sys.stderr)
        for c in r.crashes or []:
            print(f"  reproduce: python -m tests.fuzz.child {name} {c}", file=sys.stderr)
    print(f"{'harness':10} {'executions':>12} {'seconds':>8} {'exec/s':>8}  status")
    for r in results:
        rate = r.runs / r.seconds if r.seconds else 0
        print(f"{r.name:10} {r.runs:12d} {r.seconds:8.0f} {rate:8.0f}  {r.status}")
    return 1 if any(r.status.startswith("CRASH") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
