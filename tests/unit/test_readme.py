"""The README's "What render prints" section shows real output (hardening issue, item 16): each
line of its code blocks is a line ``pyproxy render`` prints for the demo file, where ``…``
stands for left-out text."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEADING = "## What `render` prints, line by line"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(HEADING)
    end = text.index("\n## ", start + len(HEADING))
    return text[start:end]


def _matches(shown: str, real: str) -> bool:
    parts = [re.escape(p.strip()) for p in shown.split("…")]
    return re.fullmatch(r".*?".join(parts), real) is not None


def test_every_line_the_readme_shows_is_printed_by_render():
    command = re.search(r"From `pyproxy render ([^`]+)`", _section())
    assert command, "the section names the command it shows"
    out = subprocess.run([sys.executable, "-m", "pyproxy", "render", *command.group(1).split()],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    blocks = re.findall(r"```\n(.*?)```", _section(), re.S)
    shown = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(shown) >= 20
    missing = [line for line in shown if not any(_matches(line, real) for real in out)]
    assert missing == [], "README lines render no longer prints:\n" + "\n".join(missing)
