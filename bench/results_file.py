"""What the benches share: bench/RESULTS.md holds one section per bench, each between its own markers, so benches
rewrite only their part; and one training run in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from train_gpt import atomic_write_bytes, replace_between_markers  # noqa: E402


def write_section(path: str, name: str, text: str) -> None:
    """Replaces the text between `<!-- name:start -->` and `<!-- name:end -->` in path (appends the section when
    the markers are missing; makes the file when it is missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Bench results\n\n"
    if start not in content and end not in content:
        content = content.rstrip("\n") + f"\n\n{start}\n{text.rstrip()}\n{end}\n"
    else:
        try:
            content = replace_between_markers(content, start, end, text.rstrip())
        except ValueError as error:
            raise SystemExit(f"error: {path}: {error}") from None
    atomic_write_bytes(path, content.encode("utf-8"))


def train_run(flags: list[str], folder: str, run_id: str) -> tuple[dict, float]:
    """python train_gpt.py FLAGS --log_dir folder --run_id run_id in a fresh process: its result.json and the wall
    seconds; a failed run raises with the tail of its stderr."""
    command = [sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), *flags, "--log_dir", folder, "--run_id", run_id]
    start = time.time()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{run_id} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    with open(os.path.join(folder, run_id, "result.json")) as handle:
        return json.load(handle), time.time() - start
