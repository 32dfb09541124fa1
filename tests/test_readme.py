"""Every ```python block of README.md runs verbatim (issue 10 item 6).

Unit of execution: the README *section* (a ``## `` heading). The python blocks of one section run
in order in one fresh namespace, so a later block may use what an earlier block of the same
section defined, and nothing leaks between sections: each section's examples are complete on
their own, as a reader who jumps to a section copies them. Blocks run in a temporary working
directory (examples may write files) with the random seed fixed. Use ```text or ```bash for
anything that must not run.
"""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(\S*)\s*$")


def readme_sections(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """``[(section title, [(first line number, code), ...]), ...]`` for sections with python blocks."""
    sections: list[tuple[str, list]] = [("(top)", [])]
    lang, start, lines = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if lang is None:
            if fence:
                lang, start, lines = fence.group(1), number + 1, []
            elif line.startswith("## "):
                sections.append((line[3:].strip(), []))
        elif fence and not fence.group(1):
            if lang == "python":
                sections[-1][1].append((start, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    assert lang is None, f"README.md: a ``` block opened at line {start - 1} is never closed"
    return [(title, blocks) for title, blocks in sections if blocks]


SECTIONS = readme_sections(README.read_text())


def test_readme_has_python_examples():
    assert sum(len(blocks) for _, blocks in SECTIONS) >= 3


@pytest.mark.parametrize("title, blocks", SECTIONS, ids=[t for t, _ in SECTIONS])
def test_readme_section_runs(title, blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    for line, code in blocks:
        exec(compile(code, f"{README}:{line}", "exec"), namespace)


def test_sections_are_parsed_as_written():
    text = "intro\n```python\na = 1\n```\n## One\n```bash\nmake\n```\n```python\nb = 2\n\nc = b\n```\n## Two\ntext\n"
    assert readme_sections(text) == [("(top)", [(3, "a = 1\n")]), ("One", [(10, "b = 2\n\nc = b\n")])]


def test_readme_sweep_files_are_valid():
    """Every ```toml block is a complete sweep file that the planner accepts as written."""
    from sparse_engine.sweep.plan import plan_sweep
    from sparse_engine.sweep.source import SweepSource
    blocks = re.findall(r"^```toml\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
    assert blocks, "README.md has no ```toml sweep file"
    for text in blocks:
        plan = plan_sweep(SweepSource(text, "README.md"))
        assert plan.trials, text
