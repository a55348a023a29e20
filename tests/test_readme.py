"""The README and the docs/ pages: every ```python block runs as pasted, every relative link resolves, the
Quickstart keeps its two bash blocks, and the README's layout lists every module."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
TEXT = {page: page.read_text(encoding="utf-8") for page in PAGES}

FENCED = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.M | re.S)
BLOCKS = [
    (page, i, body)
    for page in PAGES
    for i, body in enumerate(body for lang, body in FENCED.findall(TEXT[page]) if lang == "python")
]
README_BLOCKS = [body for page, _, body in BLOCKS if page == README]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match is not None, f"no '## {title}' section"
    return match.group(1)


def test_readme_has_python_examples():
    assert len(README_BLOCKS) >= 4


@pytest.mark.parametrize(("page", "index", "body"), BLOCKS, ids=[f"{_name(p)}-{i}" for p, i, _ in BLOCKS])
def test_python_block_runs(page, index, body, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(body, f"{_name(page)} python block {index}", "exec"), {"__name__": "__doc_block__"})


def test_quickstart_holds_two_bash_blocks():
    """What .ci/readme_blocks.py extracts and CI runs; the Quickstart comes right after the introduction."""
    quickstart = _section(TEXT[README], "Quickstart")
    assert [lang for lang, _ in FENCED.findall(quickstart)] == ["bash", "bash"]
    assert re.findall(r"^## (.*)$", TEXT[README], flags=re.M)[0] == "Quickstart"


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_docs_page_opens_with_title_and_purpose(page):
    lines = TEXT[page].splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip(), (
        f"{_name(page)}: '# Title', then a sentence"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(text: str) -> set:
    """Every heading's anchor; a repeated one gets GitHub's -1, -2, ... suffix."""
    seen: dict = {}
    for heading in re.findall(r"^#{1,6} (.*)$", FENCED.sub("", text), flags=re.M):
        slug = _slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count + 1)}


def _links(text: str):
    prose = re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))  # links inside code are not links
    return re.findall(r"\]\(([^)\s]+)\)", prose)


LINKS = [
    (page, link)
    for page in PAGES
    for link in dict.fromkeys(_links(TEXT[page]))  # each link once per page
    if not re.match(r"[a-z][a-z0-9+.-]*:", link)  # http:, https:, mailto: ...
]


@pytest.mark.parametrize(("page", "link"), LINKS, ids=[f"{_name(p)}->{link}" for p, link in LINKS])
def test_relative_link_resolves(page, link):
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    assert target.exists(), f"{_name(page)}: {link} points at a missing file"
    if anchor and target.suffix == ".md":
        assert anchor in _anchors(target.read_text(encoding="utf-8")), f"{_name(page)}: no heading for #{anchor}"


def _layout_paths() -> set:
    """The paths the README's layout block names, from its indentation (two spaces a level)."""
    (block,) = [body for lang, body in FENCED.findall(_section(TEXT[README], "Layout")) if lang == "text"]
    paths, parents = set(), []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if match is None or not re.search(r"(/|\.\w+)$", match.group(2)):
            continue  # a description's continuation line
        depth = len(match.group(1)) // 2
        parents[depth:] = []
        path = "".join(parents) + match.group(2)
        paths.add(path.rstrip("/"))
        if path.endswith("/"):
            parents.append(match.group(2))
    return paths


def test_layout_lists_every_module():
    listed = _layout_paths()
    modules = sorted(p.relative_to(ROOT).as_posix() for d in ("gqa_tune", "recipes") for p in (ROOT / d).rglob("*.py"))
    missing = [
        m
        for m in modules
        if (m.rpartition("/")[0] if m.endswith("/__init__.py") and m != "gqa_tune/__init__.py" else m) not in listed
    ]
    assert not missing, f"README's layout does not list {missing}"
