"""The docker image's parts that need no VM: the mirror address, operator extras, the host's apt."""

from __future__ import annotations

import shutil

import pytest

from ccci.config import load_settings
from ccci.errors import ConfigError
from ccci.vm import debian
from ccci.vm.extras import ImageExtras, require_abra
from ccci.vm.network import guest_registry_url


@pytest.mark.parametrize(
    "configured, guest",
    [
        ("127.0.0.1:5000", "http://10.0.2.2:5000"),
        ("localhost:5000", "http://10.0.2.2:5000"),
        ("http://127.0.0.1:38211/", "http://10.0.2.2:38211"),
        ("https://mirror.example.org:443", "https://mirror.example.org:443"),
        ("registry.lan:5000", "http://registry.lan:5000"),
    ],
)
def test_the_mirror_is_reached_at_the_host_side_of_the_forks_network(configured, guest):
    assert guest_registry_url(configured) == guest


@pytest.mark.parametrize("bad", ["127.0.0.1", "ftp://host:21", "host:0", "host:99999", "a b:5000", ""])
def test_a_malformed_mirror_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="^REGISTRY_MIRROR: "):
        guest_registry_url(bad)


def test_extras_are_read_from_the_configuration_and_enter_the_digest(tmp_path):
    abra = tmp_path / "abra"
    abra.write_bytes(b"#!/bin/sh\necho abra\n")
    abra.chmod(0o755)
    settings = load_settings({}, IMAGE_FILES=[f"/usr/local/bin/abra={abra}"], IMAGE_PACKAGES="jq,make")
    extras = ImageExtras.from_settings(settings)
    assert extras.files == (("/usr/local/bin/abra", abra),) and extras.packages == ("jq", "make")
    digest = extras.digest()
    assert digest and ImageExtras.from_settings(settings).digest() == digest
    abra.write_bytes(b"#!/bin/sh\necho abra 2\n")
    assert extras.digest() != digest  # the content is in the hash, not only the name
    abra.chmod(0o700)
    assert ImageExtras().digest() == ""


@pytest.mark.parametrize(
    "files, packages, key, problem",
    [
        (["/usr/local/bin/abra=/no/such/file"], (), "IMAGE_FILES", "cannot be read"),
        (["relative/abra=/bin/sh"], (), "IMAGE_FILES", "not an absolute path"),
        (["/usr/local/bin/abra"], (), "IMAGE_FILES", "GUEST_PATH=HOST_PATH"),
        (["/sbin/ccci-agent=/bin/sh"], (), "IMAGE_FILES", "ccci's own"),
        (["/opt/dir=/tmp"], (), "IMAGE_FILES", "not a regular file"),
        ((), ["Not_A_Package"], "IMAGE_PACKAGES", "not a Debian package name"),
    ],
)
def test_bad_extras_are_refused_naming_the_key(files, packages, key, problem):
    settings = load_settings({}, IMAGE_FILES=files, IMAGE_PACKAGES=packages)
    with pytest.raises(ConfigError, match=f"^{key}: .*{problem}"):
        ImageExtras.from_settings(settings)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")
def test_sources_and_versions_come_from_this_machines_apt():
    lines = debian.sources()
    assert lines and all(line.split()[0] == "deb" for line in lines)
    assert lines[0].split()[2] == debian.SUITE  # the release itself first, then its updates
    assert debian.version("docker.io") and debian.version("no-such-package-ccci") is None
    assert debian.kernel_package().endswith("-cloud-amd64")


def test_abra_bin_becomes_the_guests_abra_and_a_second_abra_is_refused(tmp_path):
    abra = tmp_path / "abra"
    abra.write_bytes(b"#!/bin/sh\necho abra\n")
    extras = ImageExtras.from_settings(load_settings({}, ABRA_BIN=str(abra)))
    assert extras.files == (("/usr/local/bin/abra", abra),) and extras.has_abra
    assert not ImageExtras.from_settings(load_settings({})).has_abra
    with pytest.raises(ConfigError, match="^IMAGE_FILES: /usr/local/bin/abra is ABRA_BIN's"):
        ImageExtras.from_settings(load_settings({}, ABRA_BIN=str(abra), IMAGE_FILES=[f"/usr/local/bin/abra={abra}"]))
    with pytest.raises(ConfigError, match="^ABRA_BIN: 'abra' is not an absolute path"):
        load_settings({}, ABRA_BIN="abra")


def test_an_image_for_pipelines_that_run_abra_is_refused_without_abra(tmp_path):
    recipes = tmp_path / "recipes"
    for name, run in (("plain", "echo hi"), ("needs", "abra app ps x")):
        (recipes / name).mkdir(parents=True)
        (recipes / name / "ci.yml").write_text(f"steps:\n  - name: a\n    run: {run}\n")
    with pytest.raises(ConfigError, match="^ABRA_BIN: the docker image needs abra: the ci.yml of needs in"):
        require_abra(ImageExtras(), recipes)
    abra = tmp_path / "abra"
    abra.write_bytes(b"x")
    require_abra(ImageExtras(files=(("/usr/local/bin/abra", abra),)), recipes)  # given: fine
    (recipes / "needs" / "ci.yml").write_text("image: tiny\nsteps:\n  - name: a\n    run: abra x\n")
    require_abra(ImageExtras(), recipes)  # only pipelines of the docker image count
