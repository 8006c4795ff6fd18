"""Every example in examples/ runs and prints what it promises."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_demo_shows_exact_zeros_and_parity(capsys):
    runpy.run_path(str(EXAMPLES / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "exact zeros" in out
    difference = float(re.search(r"max \|jax - torch\| = (\S+)", out).group(1))
    assert difference <= 1e-6
