"""The Dockerfile, parsed (no Docker engine needed): stages, user, entrypoint, ports, and what the image holds.

The runtime stage's smoke-check RUN step is also run here, outside Docker, against the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mongoproxy import inject

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    """One instruction: keyword, the raw argument text (continuations joined) and its 1-based line."""

    keyword: str
    text: str
    line: int
    flags: dict[str, str] = field(default_factory=dict)

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(x, str) for x in value) else None


@dataclass
class Stage:
    """One FROM ... [AS name] and the instructions under it, with ARG defaults substituted."""

    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _substitute(text: str, args: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages; ${VAR} resolved from ARG defaults as Docker scopes them."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue  # comments and parser directives (# syntax=...)
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    assert not buf, "the Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    stage_args: dict[str, str] = {}
    for line, content in logical:
        keyword, _, rest = content.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            if stages:
                # A global ARG redeclared without a value inherits its global default.
                stage_args[name] = _substitute(default, stage_args) if default else global_args.get(name, "")
            else:
                global_args[name] = default
            continue
        if keyword == "FROM":
            parts = _substitute(rest, global_args).split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(parts[0], name, []))
            stage_args = {}
            continue
        assert stages, f"line {line}: {keyword} before the first FROM"
        resolved = _substitute(rest, stage_args)
        stages[-1].instructions.append(
            Instruction(keyword, resolved, line, {k: _substitute(v, stage_args) for k, v in flags.items()})
        )
    return global_args, stages


@pytest.fixture(scope="module")
def parsed():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def builder(parsed):
    return parsed[1][0]


@pytest.fixture(scope="module")
def runtime(parsed):
    return parsed[1][-1]


# ---- stages ----


def test_two_stages_builder_then_runtime(parsed):
    _, stages = parsed
    assert [s.name for s in stages] == ["builder", "runtime"]


def test_builder_compiles_the_wheel(builder):
    # The full python image carries the C compiler the Cython extension needs.
    assert re.fullmatch(r"python:3\.11(-\w+)?", builder.base) and "slim" not in builder.base
    runs = [shlex.split(r.text) for r in builder.all("RUN")]
    # The image carries the tracing extra (a sidecar exports spans without a rebuild) and the webhook extra
    # (the same image serves `mongoproxy webhook`, deploy/webhook/).
    assert any(
        cmd[:4] == ["python", "-m", "pip", "wheel"] and "--wheel-dir" in cmd and cmd[-1] == ".[tracing,webhook]"
        for cmd in runs
    ), runs


def test_builder_copies_what_the_build_needs(builder):
    copied = [p for c in builder.all("COPY") for p in shlex.split(c.text)[:-1]]
    for needed in ("pyproject.toml", "setup.py", "MANIFEST.in", "mongoproxy/"):
        assert needed in copied
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert readme in copied, "pyproject's readme must be in the build context"
    for path in copied:
        assert (ROOT / path).exists(), f"COPY {path}: not in the repository"


def test_runtime_is_slim_python_with_iptables(runtime):
    assert runtime.base.startswith("python:3.11-slim")
    runs = [r.text for r in runtime.all("RUN")]
    apt = [r for r in runs if "apt-get install" in r]
    assert len(apt) == 1
    words = shlex.split(apt[0].replace("&&", " && "))
    installed = words[words.index("install") + 1 : words.index("&&", words.index("install"))]
    assert [w for w in installed if not w.startswith("-")] == ["iptables"]
    assert "--no-install-recommends" in installed
    assert "rm -rf /var/lib/apt/lists/*" in apt[0]
    # No compiler or source tree in the runtime image.
    for forbidden in ("gcc", "build-essential", "cython", "python3-dev"):
        assert forbidden not in " ".join(runs).lower()
    assert not runtime.all("ADD")
    assert not runtime.all("COPY"), "the runtime takes the wheels from the builder through a bind mount only"


def test_runtime_installs_only_the_wheels(runtime):
    installs = [r for r in runtime.all("RUN") if "pip install" in r.text]
    assert len(installs) == 1
    run = installs[0]
    assert run.flags.get("mount", "").split(",") == ["type=bind", "from=builder", "source=/wheels", "target=/wheels"]
    cmd = shlex.split(run.text)
    assert cmd[:4] == ["python", "-m", "pip", "install"]
    assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == "/wheels"
    assert cmd[-1] == "mongoproxy[tracing,webhook]"


def test_runs_as_numeric_non_root_uid(runtime):
    users = runtime.all("USER")
    assert len(users) == 1
    user = users[0].text
    assert re.fullmatch(r"\d+(:\d+)?", user), "a numeric USER lets Kubernetes verify runAsNonRoot"
    uid = int(user.split(":")[0])
    assert uid == 9999 == inject.InjectOptions().proxy_uid
    # Every RUN happens before USER: the image is built as root and runs as the proxy.
    assert max(r.line for r in runtime.all("RUN")) < users[0].line
    useradd = next(r.text for r in runtime.all("RUN") if "useradd" in r.text)
    assert f"--uid {uid}" in useradd


def test_entrypoint_ports_and_cmd(runtime):
    (entry,) = runtime.all("ENTRYPOINT")
    assert entry.exec_form() == ["mongoproxy"]
    (cmd,) = runtime.all("CMD")
    assert cmd.exec_form() is not None  # exec form: arguments reach mongoproxy unchanged
    ports = {p for e in runtime.all("EXPOSE") for p in e.text.split()}
    assert {"27111", "9898"} <= ports
    opts = inject.InjectOptions()
    assert {str(opts.proxy_port), str(opts.admin_port)} <= ports


def test_injected_containers_rely_on_the_entrypoint():
    """inject sets args (never command), so the image's ENTRYPOINT runs them."""
    opts = inject.InjectOptions()
    for container in (inject.sidecar_container(opts), inject.init_container(opts)):
        assert "command" not in container
        assert container["args"][0] in ("run", "init-iptables")


# ---- the build context ----


def _ignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = os.path.normpath(pattern[1:] if negate else pattern).lstrip("/")
        rx = _ignore_regex(body)
        if any(rx.match(c) for c in candidates):
            result = not negate
    return result


def _patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_dockerignore_keeps_sources_and_drops_the_rest():
    patterns = _patterns()
    for kept in (
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "README.md",
        "mongoproxy/cli.py",
        "mongoproxy/_bson_parser.pyx",
        "mongoproxy/sinks/metrics.py",
    ):
        assert not excluded(kept, patterns), kept
    for dropped in (
        ".git/config",
        "tests/unit/test_inject.py",
        "node_modules/x/index.js",
        ".venv/bin/python",
        "build/lib/x.py",
        "mongoproxy/_bson_parser.c",
        "mongoproxy/_bson_parser.cpython-311-x86_64-linux-gnu.so",
        "mongoproxy/__pycache__/cli.cpython-311.pyc",
        "deploy/README.md",
    ):
        assert excluded(dropped, patterns), dropped


def test_every_package_source_reaches_the_builder():
    patterns = _patterns()
    sources = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "mongoproxy").rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyx", ".pxd", ".pyi", ".typed")
    ]
    assert sources
    assert [s for s in sources if excluded(s, patterns)] == []


# ---- the runtime's smoke check, run outside Docker ----


def test_runtime_smoke_step_runs_against_the_checkout(runtime, tmp_path):
    step = next(r.text for r in runtime.all("RUN") if "mongoproxy --version" in r.text)
    shim = tmp_path / "mongoproxy"  # the console script, pointing at this checkout
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mongoproxy "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = dict(
        os.environ,
        PATH=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        PYTHONDONTWRITEBYTECODE="1",
    )
    step = step.replace("python -c", f"{shlex.quote(sys.executable)} -c")
    result = subprocess.run(["sh", "-c", step], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "MONGOPROXY_OUTPUT" in result.stdout
