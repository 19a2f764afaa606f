"""Command-line plumbing shared by the benchmark tools: a user's mistake is one line on stderr and exit status 2,
found before any slow work (and before anything is written)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (``prog: error: message``), without the usage block; ``--help``
    still prints the usage."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {' '.join(str(message).split())}\n")
        raise SystemExit(2)


def output_file_problem(path: Path, *, overwrite: bool, flag: str) -> str | None:
    """Why ``path`` cannot be written as a result file (None: it can): a directory, a parent folder that is
    missing or is not a folder, or a file that exists without ``--overwrite``."""
    if path.is_dir():
        return f"{flag} {path} is a directory; give a file name"
    parent = path.parent
    if not parent.exists():
        return f"{flag} {path}: the folder {parent} does not exist"
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is not a folder"
    if path.exists() and not overwrite:
        return f"{flag} {path} exists; pass --overwrite to replace it"
    return None
