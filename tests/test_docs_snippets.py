"""Every code block in README.md and docs/ runs as written, so the documentation cannot drift.

``python`` blocks are executed, each on its own (fresh namespace, an empty working folder);
``yaml`` and ``json`` blocks must parse. Shell blocks are not run (they install, serve, or train
for minutes). A block opts out with a comment on the line before its fence:

    <!-- snippet: skip REASON -->   not run (a fragment, needs the network ...); the reason is required
    <!-- snippet: slow -->          run only in the slow selection (make test-all)

New files under docs/ are picked up without registering them here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*snippet:\s*(skip|slow)\b\s*(.*?)\s*-->\s*$")
_CHECKED = ("python", "yaml", "json")


@dataclass
class Snippet:
    path: Path
    line: int  #: of the opening fence, 1-based
    language: str
    code: str
    marker: str | None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The fenced blocks of a Markdown file, with the opt-out marker just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{i + 1}: code fence is never closed")
        marker = _MARKER.match(lines[i - 1].strip()) if i > 0 else None
        found.append(Snippet(path, i + 1, opening.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                             marker.group(1) if marker else None, marker.group(2) if marker else ""))
        i = end + 1
    return found


def _all() -> list[Snippet]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [s for f in files for s in snippets(f) if s.language in _CHECKED]


def _params():
    for s in _all():
        marks = [pytest.mark.slow] if s.marker == "slow" else []
        yield pytest.param(s, id=s.id, marks=marks)


def test_the_collector_finds_blocks_and_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\nx = 1\n```\n<!-- snippet: skip a fragment -->\n```yaml\na: 1\n```\n"
                   "```bash\nls\n```\n")
    found = snippets(doc)
    assert [(s.line, s.language, s.code, s.marker, s.reason) for s in found] == [
        (2, "python", "x = 1\n", None, ""), (6, "yaml", "a: 1\n", "skip", "a fragment"), (9, "bash", "ls\n", None, "")]
    assert any(s.path.name == "README.md" and s.language == "python" and s.marker is None for s in _all())


@pytest.mark.parametrize("snippet", _params())
def test_snippet_runs(snippet: Snippet, tmp_path, monkeypatch):
    if snippet.marker == "skip":
        assert snippet.reason, f"{snippet.id}: a skipped block must say why (<!-- snippet: skip REASON -->)"
        pytest.skip(f"{snippet.id} opts out: {snippet.reason}")
    if snippet.language == "yaml":
        yaml.safe_load(snippet.code)
        return
    if snippet.language == "json":
        json.loads(snippet.code)
        return
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(snippet.code, snippet.id, "exec"), {"__name__": "__snippet__"})
    finally:
        torch.set_num_threads(threads)
