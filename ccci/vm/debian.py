"""The host's apt configuration: the Debian mirror and suites it names, and package versions.

Guest images are made of Debian packages from the mirror the machine's own apt uses. ``apt-get
indextargets`` reads that configuration (one-line ``sources.list`` and deb822 ``.sources``
alike), so ccci names no mirror host of its own. Versions come from the host's package lists
(``apt-cache``): an image's hash can then name exactly what it will contain, and ``apt-get
update`` on the host is what moves an image to newer packages.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import PermanentInfraError
from .tool import run_tool

SUITE = "bookworm"  # the guest's Debian release: its kernel, Docker and iptables are the tested ones
KERNEL_META = "linux-image-cloud-amd64"


def sources(suite: str = SUITE) -> list[str]:
    """Return one-line apt sources (``deb URI SUITE COMPONENTS``) for ``suite`` and its updates."""
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    out = run_tool(
        ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)", "Identifier: Packages"],
        package="apt",
    )
    components: dict[tuple[str, str], list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in wanted:
            uri, release, component = parts
            found = components.setdefault((uri.rstrip("/"), release), [])
            if component not in found:
                found.append(component)
    if not any(release == suite for _, release in components):
        raise PermanentInfraError(
            f"apt on this machine lists no Debian {suite} archive; add one to /etc/apt/sources.list.d "
            "and run apt-get update (guest images are built from it)"
        )
    ordered = sorted(components.items(), key=lambda item: wanted.index(item[0][1]))
    return [f"deb {uri} {release} {' '.join(comps)}" for (uri, release), comps in ordered]


def version(package: str, suite: str = SUITE) -> str | None:
    """Return the newest version of ``package`` in ``suite`` and its updates, per the host's lists."""
    return versions([package], suite)[package]


def versions(packages: list[str], suite: str = SUITE) -> dict[str, str | None]:
    """Return the newest version of each package in ``suite`` and its updates (None: unknown), in one call."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    found: dict[str, str | None] = dict.fromkeys(packages)
    for line in run_tool(["apt-cache", "madison", *packages], package="apt").splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and fields[0] in found and found[fields[0]] is None:
            where = fields[2].split()
            # madison lists a package's versions newest first: the first one of the suite wins.
            if len(where) >= 2 and where[1].split("/")[0] in wanted:
                found[fields[0]] = fields[1]
    return found


def kernel_package() -> str:
    """Follow the linux-image-cloud-amd64 metapackage to today's versioned kernel package."""
    if not shutil.which("apt-cache"):
        raise PermanentInfraError("apt-cache is missing: the guest kernel comes from Debian packages")
    for line in run_tool(["apt-cache", "depends", KERNEL_META], package="apt").splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise PermanentInfraError(f"apt-cache does not know {KERNEL_META}; run apt-get update")


def download(package: str, debs: Path, progress: Callable[[str], None]) -> Path:
    """Return a .deb of ``package`` from the apt cache or ``debs``, else apt-get download it there."""
    for cache in (debs, Path("/var/cache/apt/archives")):
        found = sorted(cache.glob(f"{package}_*.deb")) if cache.is_dir() else []
        if found:
            return found[-1]
    debs.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {package} with apt-get download")
    # Download privately, then rename into place: a concurrent builder never sees half a .deb.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
        run_tool(["apt-get", "download", "-q", package], cwd=Path(tmp), package="apt")
        fetched = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not fetched:
            raise PermanentInfraError(f"apt-get download {package} produced no .deb")
        os.replace(fetched[-1], debs / fetched[-1].name)
    return debs / fetched[-1].name
