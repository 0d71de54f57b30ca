"""The pinned Gitea, built once from its Go module into a per-user cache that every caller shares.

    ${XDG_CACHE_HOME:-~/.cache}/ccci/gitea/<version>/
    ├── .lock        flock: one builder at a time (pytest-xdist workers, scripts/gitea)
    ├── src/         a writable copy of the module: Gitea reads templates/, options/, public/
    │                from it at run time (STATIC_ROOT_PATH), as a build without `bindata` does
    ├── gitea        the binary
    └── build.json   written last, so its presence is the cache hit: version, checksum, timing

The module comes from the Go module proxy (``go mod download``) and its checksum is compared
with the one pinned here before anything of it is built. It is built inside a copy of the
module because its go.mod has ``replace`` lines (``go install module@version`` refuses those),
with cgo and the tags its SQLite driver needs, and its version string set.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MODULE = "code.gitea.io/gitea"
VERSION = "1.26.4"
# What `go mod download -json code.gitea.io/gitea@v1.26.4` reports; the Go checksum database agrees.
MODULE_SUM = "h1:VDA00oYg16VrQf3sES0NuS/oiDLAIVng/7jKHsBMP/w="
GO_MOD_SUM = "h1:5PQmlmsKf/cWl4lvXuKIlzS8Oxios7B701rKjTjDjqs="
# The toolchain to fetch from the proxy when the local Go is older than the module's `go` line.
TOOLCHAIN = "go1.26.8"
TAGS = "sqlite sqlite_unlock_notify"
CGO_CFLAGS = "-O2 -DSQLITE_MAX_VARIABLE_NUMBER=32766"  # as Gitea's Makefile builds it

Progress = Callable[[str], None]


class GiteaBuildError(RuntimeError):
    """The pinned Gitea could not be downloaded, verified or built; the message says why."""


@dataclass(frozen=True)
class Build:
    """A built Gitea: the binary, and the module copy it reads its templates and options from."""

    version: str
    binary: Path
    static_root: Path
    seconds: float  # how long building it took (when it was built, not now)


def cache_dir(version: str = VERSION) -> Path:
    """Return where Gitea ``version`` is cached."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ccci" / "gitea" / version


def to_stderr(message: str) -> None:
    """Print one progress line on stderr."""
    print(f"gitea: {message}", file=sys.stderr, flush=True)


def ensure_built(progress: Progress = to_stderr) -> Build:
    """Return the pinned Gitea, building it first unless the cache already has it."""
    root = cache_dir()
    cached = _cached(root)
    if cached is not None:
        progress(f"cache hit: {cached.binary} (Gitea {VERSION}, built in {cached.seconds:.0f} s)")
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is building Gitea {VERSION} in {root}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _cached(root)  # built by whoever held the lock
        if cached is not None:
            progress(f"cache hit: {cached.binary} (built by another process in {cached.seconds:.0f} s)")
            return cached
        return _build(root, progress)


def _cached(root: Path) -> Build | None:
    try:
        info = json.loads((root / "build.json").read_text())
    except (OSError, ValueError):
        return None
    binary, src = root / "gitea", root / "src"
    if (
        not isinstance(info, dict)
        or info.get("version") != VERSION
        or info.get("module_sum") != MODULE_SUM
        or not os.access(binary, os.X_OK)
        or not (src / "templates").is_dir()
    ):
        return None
    return Build(VERSION, binary, src, float(info.get("seconds", 0)))


def _build(root: Path, progress: Progress) -> Build:
    started = time.monotonic()
    go = shutil.which("go")
    if go is None:
        raise GiteaBuildError(
            "Go is not installed (no `go` on PATH). Install Go 1.21 or newer from https://go.dev/dl/; "
            f"it fetches the {TOOLCHAIN} toolchain Gitea {VERSION} needs by itself."
        )
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise GiteaBuildError(
            f"Gitea's SQLite driver needs cgo, and there is no C compiler ({cc}): run scripts/install, "
            "which installs gcc."
        )
    # Whatever is here without a build.json was left by a builder killed midway.
    for leftover in ("src.tmp", "gitea.tmp", "src", "gitea"):
        path = root / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -modcacherw").strip()}

    progress(f"downloading {MODULE}@v{VERSION} from the Go module proxy ({_go_env(go, 'GOPROXY', env)})")
    module = _download(go, env)
    progress(f"checksum {module['Sum']} matches the pin; copying the module to {root / 'src'}")
    shutil.copytree(module["Dir"], root / "src.tmp", symlinks=True)
    for path in [root / "src.tmp", *(root / "src.tmp").rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)

    needed = _go_line(root / "src.tmp" / "go.mod")
    local = _go_env(go, "GOVERSION", env)
    if needed and _older(local, needed):
        progress(f"the local {local} is older than the module's go {needed}: using {TOOLCHAIN} from the proxy")
        env["GOTOOLCHAIN"] = TOOLCHAIN
    env.update({"CGO_ENABLED": "1", "CGO_CFLAGS": CGO_CFLAGS})
    cmd = [
        go, "build", "-v", "-trimpath", "-tags", TAGS,
        "-ldflags", f"-s -w -X main.Version={VERSION}", "-o", str(root / "gitea.tmp"), ".",
    ]  # fmt: skip
    progress(f"building Gitea {VERSION} with {local} (the first build takes minutes; later ones are cached)")
    _run_build(cmd, root / "src.tmp", env, progress)

    (root / "src.tmp").rename(root / "src")
    (root / "gitea.tmp").rename(root / "gitea")
    seconds = time.monotonic() - started
    info = {
        "version": VERSION,
        "module": MODULE,
        "module_sum": MODULE_SUM,
        "go": env.get("GOTOOLCHAIN", local),
        "tags": TAGS,
        "seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (root / "build.json.tmp").write_text(json.dumps(info, indent=2) + "\n")
    (root / "build.json.tmp").rename(root / "build.json")
    progress(f"built {root / 'gitea'} in {seconds:.0f} s")
    return Build(VERSION, root / "gitea", root / "src", seconds)


def _download(go: str, env: dict[str, str]) -> dict[str, str]:
    """Download the pinned module and return what ``go mod download -json`` says about it."""
    with tempfile.TemporaryDirectory(prefix="ccci-gitea-dl-") as empty:  # no go.mod around
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{MODULE}@v{VERSION}"],
            cwd=empty, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    try:
        module = json.loads(proc.stdout)
    except ValueError:
        module = {}
    problem = module.get("Error") or (proc.stderr.strip() if proc.returncode else "")
    if problem or not module.get("Dir"):
        raise GiteaBuildError(
            f"could not download {MODULE}@v{VERSION} from the Go module proxy "
            f"({env.get('GOPROXY') or 'the default proxy'}): {problem or 'no module directory in the answer'}"
        )
    for key, pinned in (("Sum", MODULE_SUM), ("GoModSum", GO_MOD_SUM)):
        if module.get(key) != pinned:
            raise GiteaBuildError(
                f"go mod download gave {MODULE}@v{VERSION} with {key} {module.get(key)!r}, but {__file__} pins "
                f"{pinned!r}: refusing to build it. Either the download was tampered with, or the pin is "
                "wrong for this version."
            )
    return module


def _run_build(cmd: list[str], cwd: Path, env: dict[str, str], progress: Progress) -> None:
    """Run ``go build -v``, turning its stream of package names into a progress line now and then."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=30)
    packages = downloads = 0
    started = last = time.monotonic()
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("go: downloading "):
            downloads += 1
        elif re.fullmatch(r"[\w.~/-]+", line):  # `-v` prints each package as it is built
            packages += 1
        else:
            tail.append(line)
        now = time.monotonic()
        if now - last >= 10:
            progress(f"building: {packages} packages compiled, {downloads} modules downloaded, {now - started:.0f} s")
            last = now
    if proc.wait() != 0:
        shown = "\n".join(tail) or "(no output)"
        raise GiteaBuildError(f"go build of Gitea {VERSION} failed with exit code {proc.returncode}:\n{shown}")


def _go_env(go: str, key: str, env: dict[str, str]) -> str:
    proc = subprocess.run([go, "env", key], env=env, capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def _go_line(go_mod: Path) -> str:
    """Return the version on the ``go`` line of a go.mod, e.g. "1.26.3"."""
    match = re.search(r"^go\s+(\S+)\s*$", go_mod.read_text(), re.MULTILINE)
    return match.group(1) if match else ""


def _older(local: str, needed: str) -> bool:
    """Tell whether toolchain ``local`` ("go1.25.1") is older than go.mod's ``needed`` ("1.26.3")."""

    def parts(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", version)[:3])

    return parts(local) < parts(needed)
