"""bench/RESULTS.md holds one section per bench, each between its own markers, so benches rewrite only their part."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
