"""What an operator adds to the docker image by configuration: files and Debian packages.

``ABRA_BIN`` is the abra executable the guest runs, put in as ``/usr/local/bin/abra``;
``IMAGE_FILES`` maps more paths in the guest to files on the host; ``IMAGE_PACKAGES`` names
extra Debian packages. All of them enter the image's hash, so changing one builds a new image,
and an image built with other extras is not taken for the one the configuration asks for.
"""

from __future__ import annotations

import hashlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..config import Settings
from ..errors import ConfigError, SpecError
from ..pipeline.spec import load_pipeline
from .tool import file_hash

_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Guest paths the image's own machinery owns: an extra file there would break the machine.
_RESERVED = ("/sbin/ccci-init", "/sbin/ccci-agent", "/usr/lib/ccci", "/etc/docker/daemon.json")
ABRA_IN_GUEST = "/usr/local/bin/abra"
GUEST_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class ImageExtras:
    """Extra files (guest path, host path) and extra Debian packages for the docker image."""

    files: tuple[tuple[str, Path], ...] = ()
    packages: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageExtras:
        """Read and check ``IMAGE_FILES`` and ``IMAGE_PACKAGES``; ConfigError names the key."""
        files = []
        if settings.ABRA_BIN:
            files.append((ABRA_IN_GUEST, Path(settings.ABRA_BIN).expanduser()))
        for entry in settings.IMAGE_FILES:
            guest, sep, host = entry.partition("=")
            guest, host = guest.strip(), host.strip()
            if not sep or not guest or not host:
                raise ConfigError("IMAGE_FILES", f"{entry!r} is not GUEST_PATH=HOST_PATH")
            where = PurePosixPath(guest)
            if not where.is_absolute() or ".." in where.parts or str(where) == "/":
                raise ConfigError("IMAGE_FILES", f"{guest!r} is not an absolute path of a file in the guest")
            if any(str(where) == r or str(where).startswith(r + "/") for r in _RESERVED):
                raise ConfigError("IMAGE_FILES", f"{guest} belongs to ccci's own guest files")
            if settings.ABRA_BIN and str(where) == ABRA_IN_GUEST:
                raise ConfigError("IMAGE_FILES", f"{ABRA_IN_GUEST} is ABRA_BIN's: set only one of them")
            files.append((str(where), Path(host).expanduser()))
        packages = tuple(settings.IMAGE_PACKAGES)
        for package in packages:
            if not _PACKAGE.fullmatch(package):
                raise ConfigError("IMAGE_PACKAGES", f"{package!r} is not a Debian package name")
        extras = cls(tuple(sorted(files)), tuple(sorted(set(packages))))
        extras.check()
        return extras

    @property
    def has_abra(self) -> bool:
        """Whether the image gets an abra executable on the guest's PATH."""
        return any(
            PurePosixPath(g).name == "abra" and str(PurePosixPath(g).parent) in GUEST_PATH for g, _ in self.files
        )

    def check(self) -> None:
        """Refuse, naming IMAGE_FILES, a host file that is missing or not a regular file."""
        for guest, host in self.files:
            try:
                mode = host.stat().st_mode
            except OSError as exc:
                raise ConfigError("IMAGE_FILES", f"{host} (for {guest}) cannot be read: {exc.strerror}") from None
            if not stat.S_ISREG(mode):
                raise ConfigError("IMAGE_FILES", f"{host} (for {guest}) is not a regular file")

    def digest(self) -> str:
        """Return a hash of every extra: guest paths, file modes and contents, package names."""
        self.check()
        h = hashlib.sha256()
        for guest, host in self.files:
            mode = stat.S_IMODE(host.stat().st_mode)
            h.update(f"file {guest} {mode:o} {file_hash(host)}\n".encode())
        for package in self.packages:
            h.update(f"package {package}\n".encode())
        return h.hexdigest()[:32] if (self.files or self.packages) else ""


def require_abra(extras: ImageExtras, recipes_dir: Path) -> None:
    """Refuse, naming ABRA_BIN, a docker image without abra when a pipeline in ``recipes_dir`` runs it."""
    if extras.has_abra:
        return
    needing = []
    for ci in sorted(recipes_dir.glob("*/ci.yml")):
        try:
            pipeline = load_pipeline(ci)
        except SpecError:
            continue  # a broken ci.yml is reported by its runs, and needs nothing of the image
        if pipeline.image == "docker" and pipeline.uses_abra:
            needing.append(ci.parent.name)
    if needing:
        raise ConfigError(
            "ABRA_BIN",
            f"the docker image needs abra: the ci.yml of {', '.join(needing)} in {recipes_dir} runs it, and no abra "
            f"is given; set ABRA_BIN to an abra executable (scripts/abra builds one) or put one at {ABRA_IN_GUEST} "
            "with IMAGE_FILES",
        )
