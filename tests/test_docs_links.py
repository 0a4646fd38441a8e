"""Documentation links: every Markdown link in README.md and docs/*.md
resolves, and every docs page is linked from the README.

- A relative link must name a file or directory that exists, relative to
  the linking file, inside the repository.
- A #fragment must be a heading of the target Markdown file, as GitHub
  slugs it (lowercase; punctuation but '-' and '_' removed; spaces become
  '-'; repeated headings get -1, -2, ...), or an explicit id/name anchor.
- http(s) links are not fetched (no network here); they must be well formed.

Each failure names the file, the link and why.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md")) if DOCS.is_dir() else []


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *_pages()]


# -- parsing ------------------------------------------------------------------


class Link(NamedTuple):
    line: int  # 1-based line of the link in its file
    target: str  # the destination as written (angle brackets removed)


_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_REF_DEF = re.compile(r"^\s{0,3}\[([^\]]+)\]:\s*(<[^>]*>|\S+)")
_REF_USE = re.compile(r"\]\[([^\]]+)\]")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]*)>", re.I)
_HTML_ANCHOR = re.compile(r"<[a-z][^>]*\s(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_HTML_HREF = re.compile(r"<a\s[^>]*href\s*=\s*[\"']([^\"']+)[\"']", re.I)


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with code spans
    blanked (same length, so nothing inside them looks like a link)."""
    out = []
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        out.append((n, _CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)))
    return out


def _destination(s: str, i: int) -> tuple[str, int] | None:
    """Parse a link destination starting at s[i] (just after '('); return
    (destination, index after the closing ')') or None if it is not one."""
    while i < len(s) and s[i] in " \t":
        i += 1
    if i < len(s) and s[i] == "<":
        j = s.find(">", i)
        if j < 0:
            return None
        dest, i = s[i + 1 : j], j + 1
    else:
        depth, j = 0, i
        while j < len(s) and not s[j].isspace():
            if s[j] == "\\":
                j += 2
                continue
            if s[j] == "(":
                depth += 1
            elif s[j] == ")":
                if depth == 0:
                    break
                depth -= 1
            j += 1
        dest, i = s[i:j], j
    while i < len(s) and s[i] in " \t":
        i += 1
    if i < len(s) and s[i] in "\"'(":  # a title
        close = ")" if s[i] == "(" else s[i]
        j = s.find(close, i + 1)
        if j < 0:
            return None
        i = j + 1
        while i < len(s) and s[i] in " \t":
            i += 1
    if i >= len(s) or s[i] != ")":
        return None
    return dest, i + 1


def links(text: str) -> Iterator[Link]:
    """Every link destination of a Markdown text: inline links and images,
    full reference links (through their definitions), autolinks and HTML
    hrefs; none inside code."""
    prose = _prose_lines(text)
    defs = {}
    for n, line in prose:
        m = _REF_DEF.match(line)
        if m:
            defs[m.group(1).strip().lower()] = (n, m.group(2).strip("<>"))
    for n, line in prose:
        if _REF_DEF.match(line):
            continue
        for m in re.finditer(r"\]\(", line):
            parsed = _destination(line, m.end())
            if parsed is not None:
                yield Link(n, parsed[0])
        for m in _REF_USE.finditer(line):
            ref = m.group(1).strip().lower()
            yield Link(n, defs[ref][1]) if ref in defs else Link(n, f"[{m.group(1)}] (undefined reference)")
        for m in _AUTOLINK.finditer(line):
            yield Link(n, m.group(1))
        for m in _HTML_HREF.finditer(line):
            yield Link(n, m.group(1))
    for n, target in defs.values():
        yield Link(n, target)


def _heading_text(raw: str) -> str:
    """The text GitHub renders for a heading's inline Markdown."""
    s = _CODE_SPAN.sub(lambda m: m.group(2).strip(), raw)
    s = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", s)  # images: their alt text
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)  # links: their text
    s = re.sub(r"\[([^\]]*)\]\[[^\]]*\]", r"\1", s)
    s = re.sub(r"<[^>]+>", "", s)  # inline HTML
    s = re.sub(r"(\*\*|__|\*|~~)", "", s)  # emphasis markers
    return s.strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): lowercase, drop
    every character but letters, marks, digits, '-', '_' and spaces, then
    spaces to '-'."""
    kept = []
    for ch in _heading_text(heading).lower():
        if ch in " -_" or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every fragment a Markdown text answers to: heading slugs (repeats
    numbered as GitHub numbers them) and explicit HTML id/name anchors."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    prose = _prose_lines(text)
    headings = []
    for k, (n, line) in enumerate(prose):
        m = _ATX.match(line)
        if m:
            headings.append(m.group(2))
        elif _SETEXT.match(line) and k and prose[k - 1][0] == n - 1 and prose[k - 1][1].strip():
            prev = prose[k - 1][1]
            if not _ATX.match(prev) and not prev.lstrip().startswith(("-", "*", "|", ">")):
                headings.append(prev.strip())
        out.update(_HTML_ANCHOR.findall(line))
    for h in headings:
        base = slug(h)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


# -- checking -----------------------------------------------------------------


def _check_url(target: str) -> str | None:
    """Why an absolute URL is bad, or None."""
    parts = urlsplit(target)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.netloc or not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", parts.netloc.rsplit("@", 1)[-1]):
            return f"malformed {scheme} URL: no valid host"
        if any(ch.isspace() for ch in target):
            return "malformed URL: contains whitespace"
        return None
    if scheme == "mailto":
        return None if re.fullmatch(r"mailto:[^@\s]+@[^@\s]+", target, re.I) else "malformed mailto link"
    return f"unsupported link scheme {scheme!r}"


def check_link(source: Path, target: str, cache: dict[Path, set[str]]) -> str | None:
    """Why a link from source does not resolve, or None when it does."""
    if target.endswith("(undefined reference)"):
        return "reference link with no definition"
    if not target:
        return "empty link"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target):
        return _check_url(target)
    if target.startswith("//"):
        return "protocol-relative URL; write the scheme"
    path_part, _, fragment = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if path_part.startswith("/"):
        return "absolute path; use a path relative to the linking file"
    dest = (source.parent / path_part).resolve() if path_part else source.resolve()
    if not dest.is_relative_to(ROOT):
        return f"points outside the repository ({dest})"
    if not dest.exists():
        return f"no such file: {dest.relative_to(ROOT)}"
    if not fragment:
        return None
    fragment = unquote(fragment)
    if dest.is_dir():
        return f"a #fragment on a directory ({dest.relative_to(ROOT)})"
    if dest.suffix.lower() not in (".md", ".markdown"):
        if re.fullmatch(r"L\d+(-L\d+)?", fragment):
            return None  # GitHub's line anchors in source files
        return f"#{fragment} on a non-Markdown file ({dest.relative_to(ROOT)})"
    if dest not in cache:
        cache[dest] = anchors(dest.read_text(encoding="utf-8"))
    if fragment not in cache[dest]:
        return f"no heading with anchor #{fragment} in {dest.relative_to(ROOT)}"
    return None


def problems(path: Path) -> list[str]:
    cache: dict[Path, set[str]] = {}
    rel = path.relative_to(ROOT)
    out = []
    for link in links(path.read_text(encoding="utf-8")):
        why = check_link(path, link.target, cache)
        if why:
            out.append(f"{rel}:{link.line}: link ({link.target}): {why}")
    return out


# -- the tests --------------------------------------------------------------------


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    bad = problems(path)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = set()
    for link in links(readme.read_text(encoding="utf-8")):
        target = link.target.partition("#")[0]
        if target and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target):
            linked.add((ROOT / unquote(target)).resolve())
    missing = [str(p.relative_to(ROOT)) for p in _pages() if p.resolve() not in linked]
    assert not missing, "README.md links to no " + ", ".join(missing)


# -- the checker itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("L1: the local chunk cache", "l1-the-local-chunk-cache"),
        ("The `restore` command", "the-restore-command"),
        ("Working-set plans (replay prefetch)", "working-set-plans-replay-prefetch"),
        ("What is refused, and why", "what-is-refused-and-why"),
        ("page_size vs. page_size_kib", "page_size-vs-page_size_kib"),
        ("Targets: ≥ 5 × faster", "targets--5--faster"),
        ("A [linked](x.md) **bold** heading", "a-linked-bold-heading"),
        ("Données", "données"),
    ],
)
def test_slug_matches_github(heading, expected):
    assert slug(heading) == expected


def test_links_skip_code_and_number_repeated_headings():
    text = "\n".join([
        "# Title",
        "See [a](a.md), ![b](img/b.png \"t\") and [c](<c d.md>) and [e][ref].",
        "`[not](code.md)` and",
        "```sh",
        "[not](fenced.md)",
        "```",
        "## Part",
        "## Part",
        "Setext",
        "------",
        "[ref]: e.md#x",
    ])
    assert [link.target for link in links(text)] == ["a.md", "img/b.png", "c d.md", "e.md#x", "e.md#x"]
    assert anchors(text) == {"title", "part", "part-1", "setext"}


def test_bad_links_are_named(tmp_path, monkeypatch):
    cache: dict[Path, set[str]] = {}
    src = ROOT / "README.md"
    assert check_link(src, "https://example.org/x", cache) is None
    assert check_link(src, "https:///nohost", cache) == "malformed https URL: no valid host"
    assert check_link(src, "ftp://example.org/", cache) == "unsupported link scheme 'ftp'"
    assert check_link(src, "/etc/passwd", cache) == "absolute path; use a path relative to the linking file"
    assert check_link(src, "../outside.md", cache).startswith("points outside the repository")
    assert check_link(src, "no-such-file.md", cache) == "no such file: no-such-file.md"
    assert check_link(src, "README.md#no-such-heading", cache) == \
        "no heading with anchor #no-such-heading in README.md"
    assert check_link(src, "setup.py#L3", cache) is None
