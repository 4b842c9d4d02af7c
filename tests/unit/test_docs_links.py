"""Every relative link in README.md, docs/*.md and deploy/README.md names a file or directory that exists.

Also every `mongoproxy/...` path the docs quote in backticks exists, so a moved module cannot leave its old
path behind in the prose (the module map, the architecture page).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "deploy" / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
CODE_PATH = re.compile(r"`(mongoproxy/[A-Za-z0-9_./-]*)`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (a link inside one is an example, not a link)."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def relative_links(path: Path) -> list[str]:
    """The relative link targets of one Markdown file, without their #fragment."""
    targets = []
    for target in LINK.findall(_prose(path)):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def missing_links(path: Path) -> list[str]:
    """The relative links of `path` that resolve to nothing."""
    return [t for t in relative_links(path) if not (path.parent / t).exists()]


def missing_code_paths(path: Path) -> list[str]:
    """The `mongoproxy/...` paths quoted in `path` that do not exist in the repository."""
    quoted = [p for p in CODE_PATH.findall(_prose(path)) if "..." not in p]  # `mongoproxy/...` is a placeholder
    return [p for p in quoted if not (ROOT / p.rstrip("/")).exists()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    assert doc.exists()
    assert missing_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_module_paths_exist(doc: Path) -> None:
    assert missing_code_paths(doc) == []


def test_the_checker_finds_a_broken_link_and_a_moved_module(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    (tmp_path / "there.md").write_text("")
    doc.write_text(
        "[ok](there.md#a) [gone](nowhere.md) ![img](img/none.png) [web](https://example.com) [top](#x)\n"
        "`mongoproxy/server.py` `mongoproxy/replay.py`\n"
        "```\n[in a fence](fenced.md) `mongoproxy/fenced.py`\n```\n"
    )
    assert missing_links(doc) == ["nowhere.md", "img/none.png"]
    assert missing_code_paths(doc) == ["mongoproxy/replay.py"]


def test_the_readme_and_the_architecture_page_are_checked() -> None:
    readme = relative_links(ROOT / "README.md")
    assert "docs/architecture.md" in readme
    assert "docs/tls.md" in readme
    assert "mongoproxy/protocol/framing.py" in CODE_PATH.findall(_prose(ROOT / "docs" / "architecture.md"))
