"""The import-linter contracts of pyproject.toml ([tool.importlinter]) hold.

import-linter has no ``python -m importlinter`` entry point; its console script ``lint-imports``
calls ``importlinter.cli.lint_imports_command``, so we call that with this interpreter.
``--no-cache`` keeps it from writing ``.import_linter_cache`` into the work tree.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[2]
RUN = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
CACHE = ROOT / ".import_linter_cache"


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN, "--no-logo", "--no-cache", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_config_declares_the_contracts():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert cfg["root_package"] == "pyproxy"
    # Required for the forbidden contract to name stdlib and third-party modules.
    assert cfg["include_external_packages"] is True
    assert sorted(c["type"] for c in cfg["contracts"]) == ["forbidden", "forbidden", "layers"]


def test_lint_imports_passes_with_the_project_config():
    cache_existed = CACHE.exists()
    proc = lint_imports()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Layers: the pure core never imports the edges KEPT" in proc.stdout
    assert "Renderers and the model never run commands KEPT" in proc.stdout
    assert "The product never imports the lab, the tests or the benchmarks" in proc.stdout
    assert "Contracts: 3 kept, 0 broken." in proc.stdout
    assert CACHE.exists() == cache_existed  # --no-cache wrote nothing into the work tree


def test_the_wheel_holds_the_product_only():
    """The lab, the tests and the benchmarks run from the checkout; pyproxy's wheel (and so
    its image, which pip-installs the wheel) holds the pyproxy package alone: the packages
    setuptools finds with the project's own settings."""
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = find_packages(where=str(ROOT), include=include)
    assert "pyproxy" in found and {p.split(".")[0] for p in found} == {"pyproxy"}
    assert "lab" in find_packages(where=str(ROOT))  # the lab is a package: the filter is what keeps it out
