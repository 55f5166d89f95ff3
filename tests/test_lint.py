"""The code passes the linter and the formatter of ruff.toml (ruff at CleanRL's line length, 127)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args):
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (pip install -r requirements.txt installs it)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_passes():
    out = ruff("check", ".")
    assert out.returncode == 0, out.stdout[-3000:]


def test_ruff_format_leaves_every_file_unchanged():
    out = ruff("format", "--check", ".")
    assert out.returncode == 0, out.stdout[-3000:]
