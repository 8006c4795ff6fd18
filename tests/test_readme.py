"""Every README code block that claims to run does run, and prints what the README says.

Marker convention (in README.md):

* A ```` ```python ```` block is a **runnable** block when the line right
  before its opening fence is the HTML comment ``<!-- runs -->`` (invisible
  when the README is rendered). It must be a complete program: imports
  included, no names from other blocks. It runs in a fresh subprocess, with
  the repository root on ``PYTHONPATH`` and the repository root as its working
  directory, and must exit with status 0.
* If the runnable block is followed (only blank lines in between) by the
  comment ``<!-- output -->`` and, on the next line, a ```` ```text ```` block,
  that block is the block's expected standard output: the test compares them
  exactly, line by line, ignoring trailing whitespace and trailing blank
  lines. Print only what is deterministic (shapes, booleans, names).
* Blocks without the marker are fragments (they may rely on context, such as
  ``model`` or ``L.Trainer``) and are not run.

A marker that is not followed by a fence of the right kind is an error, so a
mistyped marker cannot silently turn a block off.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

RUNS = "<!-- runs -->"
OUTPUT = "<!-- output -->"
FENCE = re.compile(r"^```(\w*)\s*$")

#: Seconds one block may take (jax/torch imports and a jit compile on a busy 2-core machine).
TIMEOUT = 300


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    expected: str | None  # expected stdout, or None when the README states none

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def _fenced(lines: list[str], start: int, language: str) -> tuple[str, int]:
    """The body of the fenced block opening at ``lines[start]`` and the index after its close."""
    match = FENCE.match(lines[start])
    if not match or match.group(1) != language:
        raise ValueError(
            f"README.md:{start + 1}: expected a ```{language} fence after the marker, got {lines[start]!r}"
        )
    for end in range(start + 1, len(lines)):
        if lines[end].rstrip() == "```":
            return "\n".join(lines[start + 1 : end]) + "\n", end + 1
    raise ValueError(f"README.md:{start + 1}: ```{language} block is never closed")


def runnable_blocks(text: str) -> list[Block]:
    """The runnable blocks of a README, with their expected output (see the module docstring)."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == OUTPUT:
            raise ValueError(f"README.md:{i + 1}: {OUTPUT} without a runnable block right before it")
        if lines[i].strip() != RUNS:
            i += 1
            continue
        if i + 1 >= len(lines):
            raise ValueError(f"README.md:{i + 1}: {RUNS} at the end of the file")
        code, after = _fenced(lines, i + 1, "python")
        j = after
        while j < len(lines) and not lines[j].strip():
            j += 1
        expected = None
        if j < len(lines) and lines[j].strip() == OUTPUT:
            if j + 1 >= len(lines):
                raise ValueError(f"README.md:{j + 1}: {OUTPUT} at the end of the file")
            expected, after = _fenced(lines, j + 1, "text")
        blocks.append(Block(i + 2, code, expected))
        i = after
    return blocks


def _normalise(output: str) -> list[str]:
    lines = [line.rstrip() for line in output.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


BLOCKS = runnable_blocks(README.read_text(encoding="utf-8"))


def run_block(block: Block) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_readme_has_runnable_torch_and_flax_quick_starts():
    # The two quick starts near the top must stay marked: without the marker
    # this test file would quietly run nothing.
    assert len(BLOCKS) >= 2, "no runnable blocks found in README.md"
    first_two = BLOCKS[:2]
    assert any("import mhc_torch" in b.code for b in first_two), "first runnable blocks lack the torch quick start"
    assert any("import mhc_jax" in b.code for b in first_two), "first runnable blocks lack the Flax quick start"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_block_runs_and_prints_what_the_readme_says(block: Block):
    result = run_block(block)
    assert result.returncode == 0, (
        f"{block.name} exited with status {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr[-4000:]}"
    )
    if block.expected is not None:
        assert _normalise(result.stdout) == _normalise(block.expected), (
            f"{block.name} printed\n{result.stdout}\nbut the README says\n{block.expected}"
        )


def test_marker_parsing_rejects_a_marker_without_its_block():
    with pytest.raises(ValueError, match="expected a ```python fence"):
        runnable_blocks(f"{RUNS}\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="without a runnable block"):
        runnable_blocks(f"text\n{OUTPUT}\n```text\nx\n```\n")
    blocks = runnable_blocks(f"{RUNS}\n```python\nprint(1)\n```\n\n{OUTPUT}\n```text\n1\n```\n")
    assert [(b.code, b.expected) for b in blocks] == [("print(1)\n", "1\n")]
