"""The pytest side: one real Gitea per test session (so one per xdist worker), names per test.

``real_gitea`` builds the pinned Gitea if the cache lacks it (``scripts/test`` builds it first,
so this is normally a cache hit), starts it under the session's temporary directory and stops
it at the end, proving no process of it is left. A build or start failure makes every test that
needs it ERROR with the reason: the real forge is never skipped nor swapped for the fake.
Tests share the instance, never its state: each takes fresh names from ``RealGitea.unique``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from .admin import GiteaAdmin, GiteaWeb
from .build import ensure_built
from .instance import Instance, start, stop, stragglers


@dataclass
class RealGitea:
    """The session's Gitea: its instance, the admin's API client, fresh names for each test."""

    instance: Instance
    admin: GiteaAdmin
    _counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        """Where Gitea answers."""
        return self.instance.url

    def unique(self, prefix: str) -> str:
        """Return a name no other test of this session uses, e.g. ``org7``."""
        return f"{prefix}{next(self._counter)}"

    def web(self) -> GiteaWeb:
        """Return a web session signed in as the admin."""
        return GiteaWeb(self.url, self.instance.admin_user, self.instance.admin_password)


@pytest.fixture(scope="session")
def real_gitea(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGitea]:
    """The session's real Gitea, started once and stopped (with nothing left running) at the end."""
    build = ensure_built()
    directory = tmp_path_factory.mktemp("gitea")
    instance = start(directory, build)
    admin = GiteaAdmin(instance.url, instance.admin_token)
    try:
        yield RealGitea(instance, admin)
    finally:
        admin.close()
        stop(directory)
        left = stragglers(directory)
        assert not left, f"processes of the test Gitea outlived it: {left}"
