"""Settings: layering, strict types, absolute paths, validation errors that name the key, the example file."""

import logging
import re
from dataclasses import fields
from pathlib import Path

import pytest

from ccci.config import OWN_VARIABLES, Settings, doc, load_settings
from ccci.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_load_without_anything(tmp_path):
    s = load_settings({"HOME": str(tmp_path)})
    assert s.TRIGGER == "!testme"
    assert s.DISPATCH == "local"
    assert (s.RECIPES_DIR / "hello" / "ci.yml").is_file()
    assert s.WEBHOOK_SECRET == ""
    assert tmp_path / ".local" / "state" / "ccci" == s.STATE_DIR
    assert tmp_path / ".abra" == s.ABRA_HOME


def test_state_dir_follows_xdg_and_never_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path("/srv/state/ccci") == load_settings({"XDG_STATE_HOME": "/srv/state"}).STATE_DIR
    # The XDG spec says a relative XDG_STATE_HOME is to be ignored.
    assert Path("/home/u/.local/state/ccci") == load_settings({"HOME": "/home/u", "XDG_STATE_HOME": "rel"}).STATE_DIR
    for key in ("STATE_DIR", "LOCK_DIR", "RECIPES_DIR", "ABRA_HOME"):
        assert getattr(load_settings({}), key).is_absolute(), key


def test_relative_paths_are_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tmp_path / "var" == load_settings({"CCCI_STATE_DIR": "./var"}).STATE_DIR  # the environment: cwd
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "ccci.toml").write_text('STATE_DIR = "state"\nRECIPES_DIR = "../recipes"\n')
    monkeypatch.chdir("/")
    s = load_settings({"CCCI_CONFIG": str(conf_dir / "ccci.toml")})  # the file: relative to the file
    assert (conf_dir / "state", tmp_path / "recipes") == (s.STATE_DIR, s.RECIPES_DIR)
    assert load_settings(s.to_env()) == s  # children get the same absolute paths


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
        ({"CCCI_KEEP_ABRA_DIR": "perhaps"}, "KEEP_ABRA_DIR"),
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


@pytest.mark.parametrize(
    "toml, key, words",
    [
        ("MAX_RUNS = 2.7", "MAX_RUNS", "whole number"),
        ("STATE_DIR = 5", "STATE_DIR", "path"),
        ("TRIGGER = 1", "TRIGGER", "text"),
        ("KEEP_ABRA_DIR = 1", "KEEP_ABRA_DIR", "true or false"),
        ("ALLOWED_USERS = [1, 2]", "ALLOWED_USERS", "list of text"),
        ('RUN_TIMEOUT = "1 hour"', "RUN_TIMEOUT", "seconds"),
        ("RUN_TIMEOUT = 1.5", "RUN_TIMEOUT", "seconds"),
        ("MAX_BODY = true", "MAX_BODY", "whole number"),
    ],
)
def test_types_in_the_file_are_strict(tmp_path, toml, key, words):
    config = tmp_path / "ccci.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_settings({"CCCI_CONFIG": str(config)})
    assert err.value.key == key and words in str(err.value)


@pytest.mark.parametrize("value", ["2.7", "2x", " ", "two"])
def test_whole_numbers_from_the_environment_are_strict(value):
    with pytest.raises(ConfigError, match="MAX_RUNS: must be a whole number"):
        load_settings({"CCCI_MAX_RUNS": value})


@pytest.mark.parametrize(
    "value, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("2d", 172800)]
)
def test_durations_take_units(value, seconds):
    assert seconds == load_settings({"CCCI_RUN_TIMEOUT": value}).RUN_TIMEOUT


@pytest.mark.parametrize("value", ["1 hour", "1.5h", "h", "30mins", "-5m"])
def test_a_bad_duration_says_seconds(value):
    with pytest.raises(ConfigError) as err:
        load_settings({"CCCI_LOCK_WAIT": value})
    assert err.value.key == "LOCK_WAIT" and "seconds" in str(err.value) and "int()" not in str(err.value)


def test_an_unknown_ccci_variable_is_a_warning_naming_it(caplog):
    own = {name: "x" for name in OWN_VARIABLES if name != "CCCI_CONFIG"}
    with caplog.at_level(logging.WARNING, logger="ccci.config"):
        s = load_settings({"CCCI_MAX_RUN": "3", **own})
    assert s.MAX_RUNS == 2
    [record] = caplog.records
    assert "CCCI_MAX_RUN" in record.getMessage() and "did you mean CCCI_MAX_RUNS?" in record.getMessage()


def test_unknown_key_in_the_file_is_refused(tmp_path):
    config = tmp_path / "ccci.toml"
    config.write_text("MAX_RUN = 3\n")
    with pytest.raises(ConfigError, match="MAX_RUN: unknown key.*did you mean MAX_RUNS"):
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
    s = load_settings({"CCCI_ALLOWED_USERS": "a,b", "CCCI_KEEP_ABRA_DIR": "yes", "CCCI_MAX_RUNS": "3"})
    assert load_settings(s.to_env()) == s


EXAMPLE = ROOT / "deploy" / "config.example.toml"
KEY_LINE = re.compile(r"^(# )?([A-Z_]+) = ")


def test_example_file_documents_every_key_in_order():
    lines = EXAMPLE.read_text().splitlines()
    keyed = [(i, m[2]) for i, line in enumerate(lines) if (m := KEY_LINE.match(line))]
    assert [key for _, key in keyed] == [f.name for f in fields(Settings)]
    for index, key in keyed:
        assert lines[index - 1] == f"# {doc(key)}", f"{key} needs its meaning (Settings metadata) above it"


def test_the_example_file_as_copied_changes_nothing(tmp_path):
    # Only true defaults are live: a copy allows nobody, points nowhere and uses nobody's home.
    env = {"HOME": str(tmp_path)}
    assert load_settings({**env, "CCCI_CONFIG": str(EXAMPLE)}) == load_settings(env)


def test_the_example_files_examples_are_valid_and_use_no_root_paths(tmp_path):
    text = EXAMPLE.read_text()
    assert "/root" not in text
    live = tmp_path / "live.toml"
    live.write_text(re.sub(r"^# ([A-Z_]+ = )", r"\1", text, flags=re.M))
    s = load_settings({"CCCI_CONFIG": str(live), "HOME": str(tmp_path)})
    assert s.ALLOWED_ORGS == ("coop-cloud",) and Path("/var/lib/ccci") == s.STATE_DIR and s.PUBLIC_URL


def test_renamed_settings_are_still_read_with_a_warning_naming_the_new_name(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="ccci.config"):
        s = load_settings({"CCCI_KEEP_SANDBOX": "yes", "CCCI_EXECUTOR": "local"})
    assert s.KEEP_ABRA_DIR is True and s.EXECUTOR == "bwrap"
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "CCCI_KEEP_SANDBOX is now CCCI_KEEP_ABRA_DIR" in said and "EXECUTOR=local is now EXECUTOR=bwrap" in said

    caplog.clear()
    config = tmp_path / "ccci.toml"
    config.write_text('KEEP_SANDBOX = true\nEXECUTOR = "local"\n')
    with caplog.at_level(logging.WARNING, logger="ccci.config"):
        s = load_settings({"CCCI_CONFIG": str(config)})
    assert s.KEEP_ABRA_DIR is True and s.EXECUTOR == "bwrap"
    assert "the key KEEP_SANDBOX is now KEEP_ABRA_DIR" in caplog.text


def test_the_new_name_wins_over_the_old_one():
    s = load_settings({"CCCI_KEEP_SANDBOX": "yes", "CCCI_KEEP_ABRA_DIR": "no"})
    assert s.KEEP_ABRA_DIR is False
