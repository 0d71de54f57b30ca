"""Artifacts as an attacker would leave them: links out, FIFOs, hard links, floods, secrets."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from ccci.harness import artifacts
from ccci.harness.artifacts import collect
from ccci.pipeline.redact import Redactor
from ccci.vm.qemu import _plain_members


@pytest.fixture
def checkout(tmp_path):
    ws = tmp_path / "checkout"
    (ws / ".ccci" / "artifacts").mkdir(parents=True)
    return ws


def test_only_the_steps_own_regular_files_are_kept_and_redacted(checkout, tmp_path):
    out = checkout / ".ccci" / "artifacts"
    (out / "junit.xml").write_text("<testsuite token='hunter2-secret'/>\n")
    (out / "shots").mkdir()
    (out / "shots" / "home.png").write_bytes(b"\x89PNG\0\1")
    (out / "env").symlink_to("/proc/self/environ")
    (out / "etc").symlink_to("/etc")
    (out / "rel").symlink_to("junit.xml")  # even a link inside: the file itself is kept once
    os.mkfifo(out / "pipe")  # opening a FIFO must not hang the harness
    outside = tmp_path / "host-secret"
    outside.write_text("root's file\n")
    os.link(outside, out / "hard")
    kept = collect(tmp_path / "kept", Redactor(["hunter2-secret"]), checkout=checkout)
    assert kept.kept == ["junit.xml", "shots/home.png"]
    assert (tmp_path / "kept" / "junit.xml").read_text() == "<testsuite token='[redacted]'/>\n"
    assert (tmp_path / "kept" / "shots" / "home.png").read_bytes() == b"\x89PNG\0\1"
    reasons = " | ".join(kept.dropped)
    for expected in ("env: a symlink", "etc: a symlink", "rel: a symlink", "pipe: not a regular file",
                     "hard: a hard link"):  # fmt: skip
        assert expected in reasons
    assert kept.notes() and kept.notes()[0].startswith("artifacts left out:")


def test_an_artifacts_directory_that_is_a_symlink_is_not_followed(tmp_path):
    ws = tmp_path / "checkout"
    (ws / ".ccci").mkdir(parents=True)
    (ws / ".ccci" / "artifacts").symlink_to("/etc")
    kept = collect(tmp_path / "kept", Redactor(), checkout=ws)
    assert kept.kept == [] and "not a directory" in kept.dropped[0]
    ws2 = tmp_path / "checkout2"
    ws2.mkdir()
    (ws2 / ".ccci").symlink_to("/")  # committed in the PR: .ccci/artifacts is then /artifacts
    assert collect(tmp_path / "kept2", Redactor(), checkout=ws2).kept == []
    assert not (tmp_path / "kept2").exists()


def test_floods_are_bounded_and_said(checkout, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "MAX_FILES", 3)
    monkeypatch.setattr(artifacts, "MAX_FILE_BYTES", 10)
    out = checkout / ".ccci" / "artifacts"
    for i in range(5):
        (out / f"f{i}").write_text("x")
    (out / "big").write_text("y" * 11)
    deep = out
    for i in range(artifacts.MAX_DEPTH + 2):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("z")
    (out / "bad\nname").write_text("n")
    kept = collect(tmp_path / "kept", Redactor(), checkout=checkout)
    assert kept.kept == ["f0", "f1", "f2"]
    reasons = " | ".join(kept.dropped)
    assert "more than 3 files" in reasons and "big: 11 bytes" in reasons
    assert "deeper than" in reasons and "not plain text" in reasons


def test_machines_artifacts_come_out_as_plain_files_only(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind in (("report.html", tarfile.REGTYPE), ("env", tarfile.SYMTYPE), ("../up", tarfile.REGTYPE),
                           ("dev", tarfile.CHRTYPE), ("/abs", tarfile.REGTYPE)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = kind
            data = b"<p>hi</p>" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname = "/proc/self/environ"
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "out"
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        tar.extractall(dest, filter=_plain_members)
    assert sorted(p.name for p in dest.rglob("*")) == ["abs", "report.html"]  # "/abs" lands inside, as "abs"
    assert not (tmp_path / "up").exists() and not (dest / "env").exists() and not (dest / "dev").exists()
