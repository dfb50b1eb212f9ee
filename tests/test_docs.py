"""The user documentation: README length, relative links, reference wording, and the YAML option comments."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
METHOD_CONFIGS = sorted((REPO / "config" / "method" / "tsv").glob("*.yaml"))
README_MAX_LINES = 200

#: Wording of a history of the work, not of a reference: what the documents must not say.
HISTORY = [
    re.compile(r"\bNOTES\b"),  # the team's notes outside the repository
    *(re.compile(p, re.I) for p in (r"\bprevious version", r"\bfirst version", r"\bissues? #?\d+", r"\bsessions?\b")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lower case, punctuation dropped, spaces to '-')."""
    seen: Counter = Counter()
    out = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{_page_id(page)}: broken relative links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_reference_wording(page: Path):
    text = page.read_text(encoding="utf-8")
    found = [m.group(0) for pattern in HISTORY for m in pattern.finditer(text)]
    assert not found, f"{_page_id(page)}: history wording or a reference outside the repository: {found}"


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: p.name)
def test_every_option_has_a_comment(config: Path):
    """Each top-level key of a method config (its options) sits right below a comment saying what it does."""
    lines = config.read_text(encoding="utf-8").splitlines()
    missing = [
        line.split(":")[0]
        for i, line in enumerate(lines)
        if re.match(r"[A-Za-z_][\w]*\s*:", line) and not line.startswith("_target_")
        and not (i > 0 and lines[i - 1].lstrip().startswith("#"))
    ]
    assert not missing, f"{config.relative_to(REPO)}: options without a comment line directly above: {missing}"


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: p.name)
def test_config_is_linked_and_its_doc_references_exist(config: Path):
    rel = str(config.relative_to(REPO))
    assert f"]({rel})" in README.read_text(encoding="utf-8"), f"README.md does not link the option reference {rel}"
    missing = [d for d in re.findall(r"\bdocs/[\w.-]+\.md", config.read_text(encoding="utf-8")) if not (REPO / d).exists()]
    assert not missing, f"{rel} names documentation pages that do not exist: {missing}"


def test_layout_page_lists_every_module():
    """docs/layout.md names every module of the package, so that a newcomer finds each idea's place."""
    text = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    package = REPO / "fusion_bench_tsv"
    missing = [str(p.relative_to(package)) for p in sorted(package.rglob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"^\s+{re.escape(p.name)}\s", text, flags=re.M)]
    assert not missing, f"docs/layout.md does not list {missing}"


def readme_python_block() -> str:
    """The README's "From Python" code block, as the reader sees it."""
    text = README.read_text()
    section = text[text.index("## From Python\n"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    return code[:code.index("\n```")]


def test_readme_python_block_runs_on_the_offline_benchmark(tmp_path, monkeypatch, capsys):
    """The block runs as printed on a small build of the offline benchmark (the README names its tasks); every
    `run` ends with its summary and nothing prints FusionBench's 'No fabric configuration' warning or a profiler table."""
    from fusion_bench_tsv.benchmark.build import BuildSettings, build_benchmark

    settings = BuildSettings(pretrain_steps=20, pretrain_batch=32, finetune_steps=15, finetune_batch=16,
                             train_size=48, val_size=12, test_size=24)
    build_benchmark(3, tmp_path / "data", settings, show_pbar=False)
    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_block(), "README.md (From Python)", "exec"), namespace)
    out = capsys.readouterr()
    printed = out.out + out.err
    assert set(namespace["task_models"]) == {"shapes", "colors", "digits"}
    assert namespace["M"].shape == namespace["theta_0"].shape
    for method in ("TSV-M", "TSV-C", "STI"):
        assert f"{method} summary:" in printed, printed[-3000:]
    assert "No fabric configuration found" not in printed and "Profiler Report" not in printed
    assert (tmp_path / "sti" / "sti.json").is_file() and (tmp_path / "tsv_c").is_dir()
