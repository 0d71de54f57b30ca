"""ci.yml validation: every kind of mistake is refused with the file, the step and the key named."""

import json
from pathlib import Path

import pytest

from ccci.errors import SpecError
from ccci.pipeline.spec import MIN_SECRET, TEARDOWN_TIMEOUT, EnvVar, load_pipeline

GOOD = """
timeout: 120
parallelism: 2
image: abra-debian
env: {A: "1", N: 5}
steps:
  - name: deploy
    run: echo deploy
    timeout: 30
  - name: check
    needs: [deploy]
    fork_from: deploy
    allow_failure: true
    run: echo check
    env:
      TOKEN: {from_env: CCCI_TEST_TOKEN, secret: true}
      LIT: {value: "hello"}
  - name: undeploy
    teardown: true
    run: echo bye
"""


def write(tmp_path, text):
    path = tmp_path / "ci.yml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_every_key(tmp_path):
    p = load_pipeline(write(tmp_path, GOOD))
    assert (p.timeout, p.parallelism, p.image) == (120.0, 2, "abra-debian")
    assert [s.name for s in p.steps] == ["deploy", "check", "undeploy"]
    check = p.step("check")
    assert check.needs == ("deploy",) and check.fork_from == "deploy" and check.allow_failure
    assert EnvVar("TOKEN", from_env="CCCI_TEST_TOKEN", secret=True) in check.env
    assert p.step("undeploy").teardown and p.step("undeploy").timeout == TEARDOWN_TIMEOUT
    envs, secrets = p.resolve_env({"CCCI_TEST_TOKEN": "s3cret-value"})
    assert envs["check"] == {"A": "1", "N": "5", "TOKEN": "s3cret-value", "LIT": "hello"}
    assert envs["deploy"] == {"A": "1", "N": "5"}
    assert secrets == ["s3cret-value"]


def test_missing_or_short_secret_is_refused_when_resolving(tmp_path):
    p = load_pipeline(write(tmp_path, GOOD))
    with pytest.raises(SpecError, match=r"step check: env TOKEN: from_env CCCI_TEST_TOKEN is not set"):
        p.resolve_env({})
    with pytest.raises(SpecError, match="secret shorter"):
        p.resolve_env({"CCCI_TEST_TOKEN": "x" * (MIN_SECRET - 1)})


STEP = "  - name: a\n    run: echo a\n"
BAD = [
    ("not a mapping", "- 1\n", "top level must be a mapping"),
    ("no steps", "timeout: 3\n", "key 'steps': must be a non-empty list"),
    ("unknown top key", "stepz: []\nsteps:\n" + STEP, "key 'stepz': unknown key"),
    ("unknown step key", "steps:\n" + STEP + "    nedes: [b]\n", "step a: key 'nedes': unknown key"),
    ("duplicate yaml key", "steps:\n" + STEP + "    run: again\n", "duplicate key 'run'"),
    ("bad name", "steps:\n  - name: 'a b'\n    run: x\n", "step #1: key 'name'"),
    ("missing run", "steps:\n  - name: a\n", "step a: key 'run': must be a non-empty string"),
    ("duplicate names", "steps:\n" + STEP + STEP, "step a: key 'name': duplicate step name"),
    ("missing need", "steps:\n" + STEP + "    needs: [ghost]\n", "key 'needs': no step is called 'ghost'"),
    ("self need", "steps:\n" + STEP + "    needs: [a]\n", "step a: key 'needs': a step cannot need itself"),
    (
        "cycle",
        "steps:\n  - {name: a, run: x, needs: [c]}\n  - {name: b, run: x, needs: [a]}\n"
        "  - {name: c, run: x, needs: [b]}\n",
        "key 'needs': cycle a -> c -> b -> a",
    ),
    ("needs not a list", "steps:\n" + STEP + "    needs: {a: 1}\n", "step a: key 'needs': must be a list"),
    ("timeout type", "steps:\n" + STEP + "    timeout: soon\n", "step a: key 'timeout': must be a positive"),
    ("timeout zero", "timeout: 0\nsteps:\n" + STEP, "key 'timeout': must be a positive"),
    ("timeout bool", "steps:\n" + STEP + "    timeout: true\n", "step a: key 'timeout'"),
    ("parallelism", "parallelism: 0\nsteps:\n" + STEP, "key 'parallelism': must be a whole number"),
    ("allow_failure type", "steps:\n" + STEP + "    allow_failure: 'yes'\n", "step a: key 'allow_failure'"),
    ("teardown type", "steps:\n" + STEP + "    teardown: 1\n", "step a: key 'teardown'"),
    ("env type", "steps:\n" + STEP + "    env: [A]\n", "step a: key 'env': must be a mapping"),
    ("env name", "steps:\n" + STEP + "    env: {'1A': x}\n", "'1A' is not a variable name"),
    ("env bool", "steps:\n" + STEP + "    env: {A: yes}\n", "step a: key 'env': A: must be a string"),
    ("env both", "steps:\n" + STEP + "    env: {A: {value: x, from_env: Y}}\n", "exactly one of"),
    ("env unknown", "steps:\n" + STEP + "    env: {A: {value: x, secrte: true}}\n", "A: key 'secrte'"),
    ("short literal secret", "steps:\n" + STEP + "    env: {A: {value: abc, secret: true}}\n", "shorter"),
    (
        "fork_from without need",
        "steps:\n" + STEP + "  - {name: b, run: x, fork_from: a}\n",
        "step b: key 'fork_from': 'a' must also be in needs",
    ),
    (
        "teardown needing work",
        "steps:\n" + STEP + "  - {name: b, run: x, teardown: true, needs: [a]}\n",
        "step b: key 'needs': a teardown step may only need teardown steps",
    ),
    (
        "work needing teardown",
        "steps:\n  - {name: t, run: x, teardown: true}\n  - {name: b, run: x, needs: [t]}\n",
        "step b: key 'needs': 't' is a teardown step",
    ),
    ("bad yaml", "steps: [\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), [(t, m) for _, t, m in BAD], ids=[i for i, _, _ in BAD])
def test_mistakes_are_refused_naming_file_line_step_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    # The text is published on the PR: the file as <recipe>/ci.yml, never the server's path.
    assert str(info.value).startswith(f"{tmp_path.name}/ci.yml, line ")
    assert str(tmp_path) not in str(info.value) and "<unicode string>" not in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text, where",
    [
        ("steps:\n  - name: a\n    run: true\n    needz: [b]\n", "line 4, column 5: step a: key 'needz'"),
        ("steps:\n  - {name: a, run: x, needs: [ghost]}\n", "line 2, column 23: step a: key 'needs'"),
        ("steps:\n  - name: a\n    run: x\n    run: y\n", "line 4, column 5: duplicate key 'run'"),
        ("timeout: soon\nsteps:\n  - {name: a, run: x}\n", "line 1, column 1: key 'timeout'"),
        ("steps:\n  - {name: a, run: x}\n  - 7\n", "line 3, column 5: step #2: must be a mapping"),
    ],
)
def test_errors_point_at_the_line_and_column(tmp_path, text, where):
    recipe = tmp_path / "hello"
    recipe.mkdir()
    with pytest.raises(SpecError) as info:
        load_pipeline(write(recipe, text))
    assert str(info.value).startswith(f"hello/ci.yml, {where}")


def test_a_yaml_syntax_error_keeps_its_caret_diagnostic_on_lines_of_its_own(tmp_path):
    recipe = tmp_path / "hello"
    recipe.mkdir()
    with pytest.raises(SpecError) as info:
        load_pipeline(write(recipe, "steps:\n  - name: a\n    run: echo: x\n"))
    first, snippet, caret = str(info.value).split("\n")
    assert first == "hello/ci.yml, line 3, column 14: not valid YAML: mapping values are not allowed here"
    assert snippet.strip() == "run: echo: x" and caret.strip() == "^"
    assert caret.index("^") == snippet.index(": x")  # under the offending colon


def test_an_unreadable_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match=f"^{tmp_path.name}/missing.yml: cannot read"):
        load_pipeline(tmp_path / "missing.yml")


def test_setup_is_a_pipeline_key_for_the_vm_warm_base(tmp_path):
    path = tmp_path / "ci.yml"
    path.write_text("setup: echo prepared > /etc/prepared\nsteps:\n  - name: a\n    run: cat /etc/prepared\n")
    assert load_pipeline(path).setup == "echo prepared > /etc/prepared"
    path.write_text("setup: [not, text]\nsteps:\n  - name: a\n    run: echo a\n")
    with pytest.raises(SpecError, match="key 'setup'"):
        load_pipeline(path)


@pytest.mark.parametrize(
    "run, uses",
    [
        ("abra app deploy -n x", True),
        ("set -eu\n  abra app new x", True),
        ("test -f x && abra app ps x", True),
        ("out=$(abra app ps x)", True),
        ('ls "$ABRA_DIR/servers"', False),
        (". ./abra.sh && echo $ABRA_DIR", False),
        ("echo cabra", False),
    ],
)
def test_a_pipeline_knows_whether_it_runs_abra(tmp_path, run, uses):
    ci = tmp_path / "r" / "ci.yml"
    ci.parent.mkdir()
    ci.write_text(f"steps:\n  - name: a\n    run: {json.dumps(run)}\n")
    assert load_pipeline(ci).uses_abra is uses


def test_the_default_pipeline_runs_abra_and_forks_its_checks_from_health():
    pipeline = load_pipeline(Path(__file__).resolve().parents[2] / "ccci" / "recipes" / "_default" / "ci.yml")
    assert pipeline.uses_abra
    assert [s.name for s in pipeline.steps if not s.teardown] == [
        "new",
        "secrets",
        "release",
        "deploy",
        "health",
        "recipe-tests",
    ]
    assert pipeline.step("recipe-tests").fork_from == "health"
    assert [s.name for s in pipeline.steps if s.teardown] == ["undeploy", "remove"]
