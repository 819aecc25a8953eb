"""The documentation's relative links resolve: every markdown link in README.md and docs/*.md that is not a web
address names a file that exists, and an `#anchor` names a heading of the target page (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target), with an optional "title"; the text may hold one level of brackets
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text (code spans and links as their text), lowercased,
    everything but letters, digits, underscores, hyphens and spaces removed, each space a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page: its headings' slugs (a repeated slug gets -1, -2, ...) and HTML name/id anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside fenced code blocks and inline code spans."""
    found = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub(lambda m: "code" if "](" in m.group(2) else m.group(0), line)
        found.extend((number, match.group(2)) for match in LINK.finditer(line))
    return found


def broken_links(pages: list[Path], root: Path = ROOT) -> list[str]:
    """One message per broken link: page, line, target and what is missing."""
    broken: list[str] = []
    cache: dict[Path, set[str]] = {}
    for page in pages:
        for number, target in links(page):
            if target.startswith(EXTERNAL):
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(root)}:{number}: {target}"
            file = (page.parent / unquote(path)).resolve() if path else page
            if not file.exists():
                broken.append(f"{where} (no such file)")
                continue
            if anchor and file.suffix == ".md":
                if file not in cache:
                    cache[file] = anchors(file)
                if unquote(anchor) not in cache[file]:
                    broken.append(f"{where} (no heading with that anchor)")
    return broken


def test_slugs_follow_github() -> None:
    assert slug("Retrained on train+val, from scratch (Snell et al.'s protocol, 2026-12-02/03)") == \
        "retrained-on-trainval-from-scratch-snell-et-als-protocol-2026-12-0203"
    assert slug("`data_on_device: auto | true | false` (recipe key, top level)") == \
        "data_on_device-auto--true--false-recipe-key-top-level"
    assert slug("Evaluation through ONNX Runtime (`evaluate --runtime onnx`)") == \
        "evaluation-through-onnx-runtime-evaluate---runtime-onnx"
    assert slug("Accuracy ± 95% CI, Größe") == "accuracy--95-ci-größe"
    assert slug("Calibrated probabilities and \"none of these\"") == "calibrated-probabilities-and-none-of-these"


def test_links_in_code_blocks_are_ignored_and_duplicates_numbered(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## A\n\n```\n[x](missing.md)\n```\n\n`[y](missing.md)`\n\n"
                    "[a](#a) [b](#a-1) [c](#a-2) [d](other.md) [e](page.md#a)\n", encoding="utf-8")
    assert [target for _, target in links(page)] == ["#a", "#a-1", "#a-2", "other.md", "page.md#a"]
    assert broken_links([page], root=tmp_path) == ["page.md:11: #a-2 (no heading with that anchor)",
                                                   "page.md:11: other.md (no such file)"]


def test_every_relative_link_resolves() -> None:
    broken = broken_links(PAGES)
    assert not broken, f"{len(broken)} broken relative link(s) in README.md and docs/*.md:\n" + "\n".join(broken)


def table_cells(line: str) -> int:
    """The cells of a markdown table row: its pipes outside code spans and not escaped, less the outer two."""
    text = INLINE_CODE.sub("code", line.strip()).replace("\\|", "")
    return text.count("|") - 1


def test_every_table_row_has_its_header_s_cells() -> None:
    """A row with a separator too many or too few renders its numbers under the wrong column."""
    wrong = []
    for page in PAGES:
        header = None
        for number, line in prose_lines(page.read_text()):
            if not line.lstrip().startswith("|"):
                header = None
                continue
            if header is None:
                header = table_cells(line)
            elif table_cells(line) != header:
                wrong.append(f"{page.relative_to(ROOT)}:{number}: {table_cells(line)} cells, header {header}")
    assert not wrong, "\n".join(wrong)
