"""bench/RESULTS.md holds one section per bench, each between its own markers, so benches rewrite only their part."""
from __future__ import annotations

import os


def write_section(path: str, name: str, text: str) -> None:
    """Replaces the text between `<!-- name:start -->` and `<!-- name:end -->` in path (appends the section when
    the markers are missing; makes the file when it is missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    content = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Bench results\n\n"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        content = before + block + ("\n" + after if after else "")
    else:
        content = content.rstrip("\n") + "\n\n" + block
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(content)
    os.replace(temporary, path)
