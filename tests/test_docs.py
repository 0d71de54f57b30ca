"""The docs a reader is pointed at exist: every reference to docs/*.md and its sections, every README link."""

from __future__ import annotations

import re
import subprocess

from tests.support import ROOT

REFERENCE = re.compile(r"docs/(\w+)\.md((?: §\d+(?:\.\d+)?(?:,| and)?)*)")


def tracked_text_files() -> list[str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [n for n in names.split() if n.endswith((".py", ".md", ".yml", ".toml", ".env", ".conf", ".service"))]


def test_every_docs_reference_names_a_file_and_section_that_exist():
    found = 0
    for name in tracked_text_files():
        text = (ROOT / name).read_text(errors="replace")
        for doc, sections in REFERENCE.findall(text):
            found += 1
            target = ROOT / "docs" / f"{doc}.md"
            assert target.is_file(), f"{name} points at docs/{doc}.md, which does not exist"
            headings = target.read_text()
            for number in re.findall(r"§(\d+(?:\.\d+)?)", sections):
                heading = re.search(rf"^#+ {re.escape(number)}\.? ", headings, re.M)
                assert heading, f"{name}: docs/{doc}.md has no §{number}"
    assert found >= 8  # the forge client, intake, dispatch, fakes and recipes all point there


def test_nothing_points_outside_the_repository_for_the_design_or_the_protocols():
    for name in tracked_text_files():
        if name == "tests/test_docs.py" or name.startswith("docs/"):  # docs link each other relatively
            continue
        text = (ROOT / name).read_text(errors="replace")
        assert "DESIGN.md" not in text and "research/protocols" not in text, name
        assert not re.search(r"(?<![\w/])protocols\.md", text), f"{name}: say docs/protocols.md"


def test_the_docs_relative_links_resolve():
    for readme in ("README.md", "deploy/README.md", "docs/vm.md", "docs/design.md", "docs/protocols.md"):
        base = (ROOT / readme).parent
        for target in re.findall(r"\]\(((?!https?:|#)[^)\s]+)\)", (ROOT / readme).read_text()):
            assert (base / target.split("#")[0]).exists(), f"{readme} links to {target}, which does not exist"


def test_ci_runs_the_readmes_test_command_then_the_linters_and_the_type_checker():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block, "the README starts with a sh block of its two commands"
    install_line, test_line = block.group(1).strip().splitlines()[:2]
    assert "scripts/install" in install_line and "ccci serve" in install_line
    test_command = test_line.split("#")[0].strip().replace('"$CLONE"/', "./")
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert commands == [
        test_command,
        ".venv/bin/ruff check .",
        ".venv/bin/ruff format --check .",
        ".venv/bin/mypy",
    ]
