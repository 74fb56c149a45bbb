"""Every ```python block of README.md runs as written.

Each block runs in its own fresh namespace, in a temporary directory, exactly as a reader who copies
that one block would run it: it must import what it uses (``ws`` included) and must not rely on names
that another block defined. A block that cannot run in CI (it needs a GPU, a download, ...)
is marked by the HTML comment ``<!-- no-test -->`` on the line(s) just before its fence, and is
counted as skipped. New README sections are picked up automatically.
"""
import re
import textwrap
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
NO_TEST = "<!-- no-test -->"


def readme_blocks(text: str):
    """``[(line number, language, code, marked no-test)]`` for every fenced block of ``text``."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if m and lines[i].lstrip().startswith("```") and m.group(1) is not None:
            lang, start = m.group(1), i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md line {start + 1}: code fence is never closed")
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marked = k >= 0 and lines[k].strip() == NO_TEST
            blocks.append((start + 1, lang, textwrap.dedent("\n".join(lines[start + 1:j])), marked))
            i = j + 1
        else:
            i += 1
    return blocks


def test_block_parser_on_a_sample():
    sample = "text\n```python\nx = 1\n```\n<!-- no-test -->\n\n```python\nimport os\ny = 2\n```\n```bash\nls\n```\n"
    blocks = readme_blocks(sample)
    assert [(b[1], b[3]) for b in blocks] == [("python", False), ("python", True), ("bash", False)]
    assert [b[2] for b in blocks] == ["x = 1", "import os\ny = 2", "ls"]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    python = [b for b in blocks if b[1] == "python"]
    marked = [b for b in python if b[3]]
    assert python, "README.md has no python block"
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: a second thread only spins on a shared CI machine
    try:
        ran = _run_blocks(python)
    finally:
        torch.set_num_threads(threads)
    assert ran >= len(python) - len(marked)
    print(f"ran {ran} README python blocks; {len(marked)} marked no-test (lines {[b[0] for b in marked]})")


def _run_blocks(python) -> int:
    ran = 0
    for line, _, code, skip in python:
        if skip:
            continue
        namespace = {"__name__": "__readme__"}
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:  # name the block, keep the traceback
            raise AssertionError(f"the README python block at line {line} fails: {type(exc).__name__}: {exc}") from exc
        ran += 1
    return ran
