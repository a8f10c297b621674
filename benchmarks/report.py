"""What the benchmark scripts share: the commit they measured and how they write reports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The measured commit: EPG_GIT_COMMIT (the GPU machine gets a copy without .git), else git."""
    if os.environ.get("EPG_GIT_COMMIT"):
        return os.environ["EPG_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown (no git checkout; pass EPG_GIT_COMMIT)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def fmt(value, spec: str, suffix: str = "") -> str:
    """A table cell: empty for None."""
    return "" if value is None else format(value, spec) + suffix


def write_report(json_path: str | None, markdown_path: str | None, payload: dict, markdown: str) -> None:
    """JSON and/or Markdown files, as asked for on the command line."""
    for path, text in ((json_path, json.dumps(payload, indent=1, default=str) + "\n"), (markdown_path, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
