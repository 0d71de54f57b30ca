"""Settings: layering, validation errors that name the key, and the documented example file."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from ccci.config import DESCRIPTIONS, REPO_ROOT, Settings, load_settings
from ccci.errors import ConfigError


def test_defaults_load_without_anything():
    s = load_settings({})
    assert s.TRIGGER == "!testme"
    assert s.DISPATCH == "local"
    assert s.RECIPES_DIR == REPO_ROOT / "recipes"
    assert s.WEBHOOK_SECRET == ""


def test_file_overrides_defaults_and_env_overrides_file(tmp_path):
    config = tmp_path / "ccci.toml"
    config.write_text('MAX_RUNS = 5\nTRIGGER = "!ci"\nALLOWED_USERS = ["alice", "bob"]\n')
    s = load_settings({"CCCI_CONFIG": str(config), "CCCI_MAX_RUNS": "7"})
    assert s.MAX_RUNS == 7  # env wins over the file
    assert s.TRIGGER == "!ci"  # the file wins over the default
    assert s.ALLOWED_USERS == ("alice", "bob")


def test_lists_from_the_environment_are_comma_separated():
    assert load_settings({"CCCI_ALLOWED_ORGS": " coop-cloud, recipe-maintainers ,"}).ALLOWED_ORGS == (
        "coop-cloud",
        "recipe-maintainers",
    )


@pytest.mark.parametrize(
    "env, key",
    [
        ({"CCCI_MAX_RUNS": "many"}, "MAX_RUNS"),
        ({"CCCI_MAX_RUNS": "0"}, "MAX_RUNS"),
        ({"CCCI_DISPATCH": "kubernetes"}, "DISPATCH"),
        ({"CCCI_EXECUTOR": "docker"}, "EXECUTOR"),
        ({"CCCI_FORGE_URL": "git.example.org"}, "FORGE_URL"),
        ({"CCCI_TRIGGER": "testme"}, "TRIGGER"),
        ({"CCCI_TRIGGER": "!test me"}, "TRIGGER"),
        ({"CCCI_ALLOWED_USERS": "alice,bob smith"}, "ALLOWED_USERS"),
        ({"CCCI_KEEP_SANDBOX": "perhaps"}, "KEEP_SANDBOX"),
        ({"CCCI_DISPATCH": "drone"}, "DRONE_URL"),
        ({"CCCI_DOMAIN": "Not A Domain"}, "DOMAIN"),
        ({"CCCI_DRONE_REPO": "no-slash"}, "DRONE_REPO"),
    ],
)
def test_bad_values_are_refused_naming_the_key(env, key):
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")


def test_unknown_key_in_the_file_is_refused(tmp_path):
    config = tmp_path / "ccci.toml"
    config.write_text("MAX_RUN = 3\n")
    with pytest.raises(ConfigError, match="MAX_RUN: unknown key"):
        load_settings({"CCCI_CONFIG": str(config)})


def test_missing_or_broken_file_names_ccci_config(tmp_path):
    with pytest.raises(ConfigError, match="CCCI_CONFIG"):
        load_settings({"CCCI_CONFIG": str(tmp_path / "nope.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("MAX_RUNS = \n")
    with pytest.raises(ConfigError, match="CCCI_CONFIG.*not valid TOML"):
        load_settings({"CCCI_CONFIG": str(broken)})


def test_secrets_never_show_in_repr():
    s = load_settings({"CCCI_FORGE_TOKEN": "tok-123456789", "CCCI_WEBHOOK_SECRET": "hook-secret-xyz"})
    assert "tok-123456789" not in repr(s)
    assert "hook-secret-xyz" not in repr(s)
    assert set(s.secrets()) == {"tok-123456789", "hook-secret-xyz"}


def test_to_env_round_trips():
    s = load_settings({"CCCI_ALLOWED_USERS": "a,b", "CCCI_KEEP_SANDBOX": "yes", "CCCI_MAX_RUNS": "3"})
    assert load_settings(s.to_env()) == s


def test_example_file_documents_every_key_and_loads():
    example = REPO_ROOT / "deploy" / "config.example.toml"
    text = example.read_text()
    keys = re.findall(r"^([A-Z_]+) = ", text, re.M)
    assert keys == [f.name for f in fields(Settings)]
    lines = text.splitlines()
    for key in keys:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert lines[index - 1] == f"# {DESCRIPTIONS[key]}", f"{key} needs its comment above it"
    assert load_settings({"CCCI_CONFIG": str(example)}).ALLOWED_ORGS == ("coop-cloud",)
    assert Path(example).is_file()
