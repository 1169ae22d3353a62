"""`pip install .` from a clean checkout gives a working `nswatch` command with the whole package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_every_module_and_a_working_command(tmp_path: Path) -> None:
    """The wheel built from a clean copy holds every module of the package, and its `nswatch` runs."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    pip = [sys.executable, "-m", "pip"]
    # Offline: the test extras carry the build backend (setuptools).
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("nswatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "nswatch").rglob("*")
        if p.is_file() and p.suffix in {".py", ".typed"}
    }
    assert package - names == set()
    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The installed copy only (run away from the checkout); the dependencies
    # come from this interpreter's site-packages.
    env = {**os.environ, "PYTHONPATH": str(target)}
    p = subprocess.run(
        [str(target / "bin" / "nswatch"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: nswatch ")
    p = subprocess.run(
        [sys.executable, "-c", "import nswatch; print(nswatch.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert p.stdout.strip() == str(target / "nswatch" / "__init__.py")
