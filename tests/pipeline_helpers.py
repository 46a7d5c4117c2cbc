"""Run the Snakemake workflow as a program and read what it did."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAKEMAKE = os.path.join(os.path.dirname(sys.executable), "snakemake")


def snakemake(input_root: str, output_root: str, *extra: str, config: dict | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """``snakemake --cores 2`` in the repository, on ``input_root``, writing to ``output_root``."""
    settings = {"input_root": input_root, "output_root": output_root, "check": "{length: 512}"}
    settings.update(config or {})
    cmd = [SNAKEMAKE, "--cores", "2", "--config", *[f"{k}={v}" for k, v in settings.items()], *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """Jobs per rule that Snakemake ran (or, with -n, would run), from its job headers."""
    counts: dict[str, int] = {}
    for match in re.finditer(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$", output, re.MULTILINE):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def tree_state(root: str) -> dict[str, tuple]:
    """Every path under ``root`` with its type, size, mtime, mode and content hash."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            digest = ""
            if stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            state[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns,
                                                  stat.S_IMODE(st.st_mode), digest)
    return state


def make_read_only(root: str) -> None:
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & ~0o222)
    os.chmod(root, os.stat(root).st_mode & ~0o222)


def make_writable(root: str) -> None:
    os.chmod(root, os.stat(root).st_mode | 0o200)
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o200)
