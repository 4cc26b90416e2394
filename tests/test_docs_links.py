"""README.md and docs/: every relative Markdown link and anchor resolves, and README stays a short front door
whose Quickstart's second command is the line CI runs (.ci/run). Standard library only: fast."""

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKDOWN_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.S)
# [text](target "title") and ![alt](target); the text may hold one level of brackets and span lines
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>\n]*>|\S+)", re.M)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:name|id)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def blank_fences(text: str) -> str:
    """``text`` with fenced code blocks replaced by spaces (newlines and offsets kept)."""
    lines = text.split("\n")
    fence = None
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            lines[i] = " " * len(line)
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = None
            lines[i] = " " * len(line)
    return "\n".join(lines)


def blank_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code spans replaced by spaces (newlines and offsets kept)."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), blank_fences(text))


def heading_text(raw: str) -> str:
    """The text GitHub renders for a heading's Markdown: links and images as their text, no code or emphasis
    markers, no HTML tags."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("`", "").replace("*", "")


def slug(text: str) -> str:
    """GitHub's anchor for a heading's text: lowercase; keep letters, marks, decimal digits, connector
    punctuation (the underscore), spaces and hyphens; every space becomes a hyphen."""
    kept = [c for c in heading_text(text).strip().lower()
            if c in " -" or unicodedata.category(c)[0] in "LM" or unicodedata.category(c) in ("Nd", "Pc")]
    return "".join(kept).replace(" ", "-")


def anchors(md_file: Path) -> set[str]:
    """Every anchor GitHub gives ``md_file``: its headings' slugs (a repeated slug gets -1, -2, ...) and
    explicit HTML anchors."""
    text = blank_fences(md_file.read_text(encoding="utf-8"))
    lines = text.split("\n")
    headings = []
    for i, line in enumerate(lines):
        m = ATX_HEADING.match(line)
        if m:
            headings.append(m.group(2) or "")
        elif (SETEXT_UNDERLINE.match(line) and i > 0 and lines[i - 1].strip()
              and not ATX_HEADING.match(lines[i - 1]) and not lines[i - 1].lstrip().startswith(("|", "-", "*", ">"))):
            headings.append(lines[i - 1].strip())
    seen: dict[str, int] = {}
    found = set()
    for heading in headings:
        base = candidate = slug(heading)
        while candidate in seen:
            seen[base] += 1
            candidate = f"{base}-{seen[base]}"
        seen[candidate] = 0
        found.add(candidate)
    return found | set(HTML_ANCHOR.findall(text))


def broken_links(md_file: Path, root: Path = ROOT) -> list[str]:
    """One message (file:line: link: why) per relative link or image of ``md_file`` whose file does not exist
    or whose anchor names no heading of the Markdown file it points to. Web and mail links are not checked."""
    text = blank_code(md_file.read_text(encoding="utf-8"))
    links = [(m.start(), m.group(0), m.group(1)) for m in INLINE_LINK.finditer(text)]
    links += [(m.start(), m.group(0), m.group(1)) for m in REFERENCE_DEF.finditer(text)]
    try:
        name = md_file.relative_to(root)
    except ValueError:
        name = md_file
    problems = []
    for offset, written, target in sorted(links):
        target = target.strip("<>")
        if not target or SCHEME.match(target):
            continue
        line = text.count("\n", 0, offset) + 1
        where = f"{name}:{line}: {' '.join(written.split())}"
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            dest = md_file
        elif path_part.startswith("/"):
            dest = root / path_part.lstrip("/")
        else:
            dest = md_file.parent / path_part
        if not dest.exists():
            problems.append(f"{where}: no such file {path_part}")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            if unquote(anchor) not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("md_file", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(md_file):
    problems = broken_links(md_file)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading (v2)\n\n## Real heading (v2)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#real-heading-v2) and [fine too](other.md#real-heading-v2-1), [self](#page)\n"
        "[gone](missing.md) and\n"
        "[bad anchor](other.md#no-such-heading)\n"
        "![picture](images/none.png) [self bad](#nope)\n"
        "```\n[in a code block](missing-in-code.md)\n```\n"
        "`[in a code span](missing-in-span.md)` [web](https://example.com/x) [mail](mailto:a@b.c)\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 4, problems
    assert problems[0].startswith("page.md:4: [gone](missing.md): no such file")
    assert problems[1].startswith("page.md:5: [bad anchor](other.md#no-such-heading): no heading")
    assert problems[2].startswith("page.md:6: ![picture](images/none.png): no such file")
    assert problems[3].startswith("page.md:6: [self bad](#nope): no heading")


@pytest.mark.parametrize("heading, expected", [
    ("Evaluation (ADM metrics)", "evaluation-adm-metrics"),
    ("Text encoders (`ditmoe/text/`)", "text-encoders-ditmoetext"),
    ("Planner and the G/2-16E2A layout", "planner-and-the-g2-16e2a-layout"),
    ("DiT-MoE-G/2-16E2A at 512×512 on 8 nodes × 8 A100-80GB", "dit-moe-g2-16e2a-at-512512-on-8-nodes--8-a100-80gb"),
    ("Latent shard format (`ditmoe/data/latent_format.py`)", "latent-shard-format-ditmoedatalatent_formatpy"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def quickstart_commands() -> tuple[list[str], int]:
    """The lines starting with ``python3 -m venv`` in README's Quickstart code blocks, and how many code
    blocks the Quickstart has."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Quickstart")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    commands, blocks, in_block = [], 0, False
    for line in lines[start + 1:end]:
        if FENCE.match(line):
            blocks += not in_block
            in_block = not in_block
        elif in_block and line.lstrip().startswith("python3 -m venv"):
            commands.append(line.strip())
    return commands, blocks


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES}: move details to docs/"


def test_quickstart_has_exactly_two_commands_in_one_block():
    commands, blocks = quickstart_commands()
    assert blocks == 1, f"README's Quickstart has {blocks} code blocks; expected one"
    assert len(commands) == 2, f"README's Quickstart has {len(commands)} commands; expected two: {commands}"


def test_quickstart_command_2_is_what_ci_runs():
    commands, _ = quickstart_commands()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "python3 -m venv" in line]
    assert len(ci) == 1, f".ci/run should run one python3 -m venv line, found {ci}"
    assert commands[-1] == ci[0], (
        f"README's command 2 and .ci/run differ:\n  README:  {commands[-1]}\n  .ci/run: {ci[0]}")
