"""The recipe checkout with real git: the pinned PR head, and the base repository's releases."""

from __future__ import annotations

from ccci.harness.checkout import checkout_pull
from tests.fakes.gitrepo import git, make_recipe_repo


def test_the_pinned_head_is_checked_out_with_the_base_repositorys_release_tags(tmp_path):
    repo = make_recipe_repo(tmp_path / "forge")
    released = repo.tag("1.0.0+1.27.2")
    head = repo.open_pr(7, {"compose.yml": "version: '3.8'\nservices: {}\n"})
    dest = tmp_path / "checkout"
    checkout_pull(f"file://{repo.bare}", 7, head, dest)
    assert git("rev-parse", "HEAD", cwd=dest) == head
    # The upgrade check deploys the latest release first: its tag must be there.
    assert git("tag", "--list", cwd=dest) == "1.0.0+1.27.2"
    assert git("rev-parse", "1.0.0+1.27.2^{commit}", cwd=dest) == released
