"""Shared fixtures: one SecantusDB per session, scripted servers, both event loops, the `system` marker.

With MONGOPROXY_REQUIRE_SYSTEM=1 (CI) any skipped test fails the session: CI runs with nothing skipped.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from pathlib import Path

import pytest

from tests.support.loops import LOOP_KINDS, run_async
from tests.support.scripted_server import ScriptedServer
from tests.support.system import system_required

TESTS_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: needs system tools or root (skipped with a reason outside CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    system_dir = TESTS_DIR / "system"
    for item in items:
        if system_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)
    # `slow` tests (minutes of work) are deselected, not skipped, unless MONGOPROXY_SLOW_TESTS=1: a skip would
    # fail CI's guard, and CI runs their smaller variants instead.
    if not os.environ.get("MONGOPROXY_SLOW_TESTS"):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and system_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


_skipped: list[str] = []


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level importorskip (or any skip raised while collecting) removes the whole module's tests
    # without a test report: under the guard it is a failure like any other skip.
    if report.skipped and system_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid} (collection): {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and system_required():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _skipped and system_required():
        terminalreporter.write_sep("=", "MONGOPROXY_REQUIRE_SYSTEM=1: skipped tests are failures", red=True)
        for line in _skipped:
            terminalreporter.write_line(f"SKIPPED {line}")


# ---------------------------------------------------------------- SecantusDB


@pytest.fixture(scope="session")
def secantus():
    """One SecantusDB (`--storage-path :memory:`) for the whole session; use `db_name` to keep tests apart."""
    try:
        import secantus  # noqa: F401
    except ImportError:
        pytest.fail("secantusdb is not installed: pip install -e '.[test]'", pytrace=False)
    from tests.support.secantus import SecantusServer

    server = SecantusServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def secantus_client(secantus):
    """A pymongo client connected directly to the session's SecantusDB."""
    client = secantus.client()
    try:
        yield client
    finally:
        client.close()


_db_counter = itertools.count(1)


@pytest.fixture
def db_name(request: pytest.FixtureRequest) -> str:
    """A database name unique to this test (valid for MongoDB: < 64 bytes, no /\\. "$*<>:|?)."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t{os.getpid() % 10000}_{next(_db_counter)}_{base}"


# ---------------------------------------------------------------- scripted servers


@pytest.fixture
def scripted_server():
    """Factory: scripted_server(handler, host="127.0.0.1", loop_kind="asyncio") -> started ScriptedServer.

    All servers stop at teardown; an exception raised inside a handler fails the test there.
    """
    servers: list[ScriptedServer] = []

    def start(handler, host: str = "127.0.0.1", port: int = 0, loop_kind: str = "asyncio") -> ScriptedServer:
        srv = ScriptedServer(handler, host, port, loop_kind=loop_kind).start()
        servers.append(srv)
        return srv

    yield start
    errors = []
    for srv in servers:
        try:
            srv.stop()
        except AssertionError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- event loops


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over "asyncio" and "uvloop"; run coroutines with `arun` or run_async(coro, loop_kind)."""
    return request.param


@pytest.fixture
def arun(loop_kind: str):
    """arun(coro, timeout=60) runs a coroutine on a fresh loop of the test's `loop_kind`."""
    return functools.partial(run_async, loop_kind=loop_kind)
