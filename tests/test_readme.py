"""The README is the front door (issue 26): short, every link resolves, and what it shows is what the code does, so it
cannot go stale silently. The laptop command it gives is run as written and must end with the lines it shows (the
losses to their printed digits; times, memory and paths are the machine's); its map of train_gpt.py must point at the
file's section banners."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO_ROOT, run_script  # noqa: E402

README = os.path.join(REPO_ROOT, "README.md")
DOCS = os.path.join(REPO_ROOT, "docs")


def readme_text() -> str:
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def markdown_files() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def heading_slugs(path: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    with open(path, encoding="utf-8") as handle:
        headings = [line.lstrip("#").strip() for line in handle if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    lines = readme_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the details to docs/"
    sections = [line for line in lines if line.startswith("## ")]
    assert sections[:4] == ["## Run it", "## The tracks", "## Try an idea", "## Reading a run"], sections


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_every_relative_link_resolves(path):
    """Each [text](target) that is not a web address names a file or folder of the repository, and an #anchor in a
    markdown target (or in the file itself) names one of its headings; a train_gpt.py#Lnnn anchor a line that exists."""
    text = open(path, encoding="utf-8").read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor not in heading_slugs(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".py"):
            line = int(anchor.lstrip("L"))
            if line > sum(1 for _ in open(resolved, encoding="utf-8")):
                broken.append(target)
    assert not broken, f"{os.path.relpath(path, REPO_ROOT)}: links that resolve to nothing: {broken}"


def shown_block(after: str) -> list[str]:
    """The lines of the first fenced block after the paragraph containing `after`."""
    text = readme_text()
    start = text.index("```", text.index(after))
    body = text[text.index("\n", start) + 1:text.index("```", start + 3)]
    return body.rstrip("\n").splitlines()


MACHINE = r"(\d+ ms/step|[\d.]+k? tok/s|eta \d+m\d+s|eval [\d.]+s|mem [\d.]+ GiB|wall \d+m\d+s|peak mem [\d.]+ GiB|\| \S+$)"


def test_the_laptop_command_ends_with_the_lines_the_readme_shows(tmp_path):
    """The README's laptop command, as written (one thread, as the README measured it), ends with the README's last
    lines: the same fields in the same order and the same losses, bits per byte, token counts and steps to the digits
    printed (0.0002 allowed for another CPU's last-bit rounding); only times, memory and the run folder differ."""
    command = shown_block("**On a laptop**")[0].split("#")[0].split()
    assert command[:2] == ["python", "train_gpt.py"], command
    result = run_script(command[2:] + ["--log_dir", str(tmp_path), "--run_id", "readme"], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()
    for shown in shown_block("It prints a line per step"):
        prefix = shown.split("|")[0].strip()
        matches = [line for line in printed if line.startswith(prefix) and line.split("|")[0].strip() == prefix]
        assert matches, f"no printed line starts like the README's {shown!r}"
        line = matches[-1]
        shape = lambda text: re.sub(r"-?\d+(\.\d+)?", "#", re.sub(MACHINE, "_", text))  # times etc. masked first
        assert shape(line) == shape(shown), (line, shown)
        numbers = lambda text: [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", re.sub(MACHINE, "_", text))]
        assert numbers(line) == pytest.approx(numbers(shown), abs=2e-4), (line, shown)


MAP_START, MAP_END = "<!-- map:start -->", "<!-- map:end -->"


def file_map() -> str:
    """The README's map of train_gpt.py, from the file itself: each section banner (a comment line under a line of
    dashes) and each harness part (`# --- title ---`), with its line and size. Rewrite it with
    `python tests/test_readme.py`."""
    path = os.path.join(REPO_ROOT, "train_gpt.py")
    lines = open(path, encoding="utf-8").read().splitlines()
    starts, harness = [], None
    for number, line in enumerate(lines, 1):
        if line.startswith("# ") and number > 1 and re.match(r"^# -{20,}$", lines[number - 2]):
            starts.append((number, line[2:]))
            harness = number if line.startswith("# Harness") else harness
        elif harness and re.match(r"^# --- .* ---$", line):
            starts.append((number, "  " + line[6:-4]))
    rows = ["| line | section | lines |", "|---|---|---|"]
    for (number, title), (end, _) in zip(starts, starts[1:] + [(len(lines) + 1, "")]):
        name, _, what = title.strip().replace("<", "&lt;").partition(": ")
        label = f"**{name}**" if number == harness else name
        if number == harness:
            what = "nothing below changes a number: " + what
        rows.append(f"| [{number}](train_gpt.py#L{number}) | {'&nbsp;&nbsp;' if title.startswith('  ') else ''}"
                    f"{label}{': ' + what if what else ''} | {end - number} |")
    return "\n".join(rows)


def test_the_readme_map_is_the_files_sections():
    """The map in the README is what file_map() reads from train_gpt.py now (each link lands on its banner)."""
    text = readme_text()
    shown = text[text.index(MAP_START) + len(MAP_START):text.index(MAP_END)].strip()
    assert shown == file_map(), "the README's map of train_gpt.py is stale: python tests/test_readme.py rewrites it"


if __name__ == "__main__":  # rewrite the README's map of train_gpt.py
    text = readme_text()
    start, end = text.index(MAP_START) + len(MAP_START), text.index(MAP_END)
    with open(README, "w", encoding="utf-8") as handle:
        handle.write(text[:start] + "\n" + file_map() + "\n" + text[end:])
