"""Where a benchmark's numbers come from: commit, command, machine. Shared by every script."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from qatkd.export.run import machine

__all__ = ["command", "git_commit", "machine"]


def git_commit() -> str:
    """The commit the benchmark ran on, flagged when the tree had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain")
        return git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)
