"""The README's set-up and test commands are what CI runs, and the quick-start commands work."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def _fenced_blocks(markdown: str, heading: str) -> list[str]:
    """Code blocks of the section whose heading contains ``heading``."""
    sections = re.split(r"^#{1,3} ", markdown, flags=re.M)
    for sec in sections:
        title = sec.splitlines()[0] if sec else ""
        if heading.lower() in title.lower():
            return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", sec, flags=re.S)
    raise AssertionError(f"README has no section titled like {heading!r}")


def _commands(block: str) -> list[str]:
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ci_lines = {ln.strip() for ln in ci.splitlines()}
    setup = _commands(_fenced_blocks(readme, "Install")[0])
    test = _commands(_fenced_blocks(readme, "Test")[0])
    assert len(setup) == 1, "the README set-up must be ONE command"
    assert setup[0] in ci_lines
    assert "torch==2.14.1" in setup[0] and "torchvision==0.29.1" in setup[0]
    assert "samples fetch" in setup[0], "the set-up command fetches the sample data"
    assert test[0] in ci_lines
