"""ci.yml: a recipe's CI definition, loaded and validated into a ``Pipeline`` before anything runs.

    timeout: 1800            # the whole run, seconds (default 3600)
    parallelism: 4           # steps running at once (default 4)
    image: docker            # VM image: docker (default: Docker and abra) or tiny (ccci's own tests)
    setup: apt-get install -y jq   # VM executor: run once in the warm base, cached by image + setup
    network: true            # process sandbox: steps may use the host's network (default false)
    env:                     # added to every step's environment
      LETS_ENCRYPT_ENV: ""
    steps:
      - name: deploy         # [A-Za-z0-9_.-]+, unique
        run: abra app deploy -C -n "$APP_DOMAIN"     # /bin/sh -c, recipe checkout as cwd
        timeout: 600         # this step, seconds (default: only the run's timeout bounds it)
      - name: smoke
        needs: [deploy]      # starts when these passed; skipped if one did not
        fork_from: deploy    # run in a copy of deploy's machine as it was when deploy ended
        allow_failure: true  # a failure here does not fail the run
        env:
          PLAIN: some value
          TOKEN: {from_env: SMOKE_TOKEN, secret: true}   # read from ccci's environment, redacted
      - name: undeploy
        teardown: true       # runs last, whatever happened (timeout default 600 s)
        run: abra app undeploy -n "$APP_DOMAIN"

An env value is a string (numbers are accepted and stringified) or a mapping with exactly one of
``value`` (literal) or ``from_env`` (the name of a variable of the environment ccci runs in —
where operators keep secrets — read when the run starts) and an optional ``secret: true``.
Secret values are handed to the redactor and must be at least ``MIN_SECRET`` characters long, so
that redacting them cannot shred ordinary output.

Rules checked here, each error naming the file (as ``<recipe>/ci.yml``, relative to RECIPES_DIR:
the text is published on the PR, where the server's paths mean nothing), the line and column,
the step and the key: unknown keys, bad types,
duplicate step names, ``needs`` naming unknown steps, cycles, ``fork_from`` not among the step's
``needs``, teardown steps needing or forking from non-teardown steps, and work steps needing
teardown steps. Between teardown steps ``needs`` only orders them: a teardown always runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpecError
from .yamlfile import at as _at
from .yamlfile import label_of, read_yaml
from .yamlfile import mark_of as _mark

DEFAULT_TIMEOUT = 3600.0
DEFAULT_PARALLELISM = 4
DEFAULT_IMAGE = "docker"  # the guest image that can run Docker and abra; tiny is for ccci's own tests
TEARDOWN_TIMEOUT = 600.0
MIN_SECRET = 8

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# "abra" as a command word: at a line's start or after a shell operator, not inside another word
# or a path (ABRA_DIR, $ABRA_DIR/servers and ./abra.sh do not count).
_ABRA_COMMAND = re.compile(r"(?:^|[\s;&|(`]|\$\()abra(?=\s|$|;|\))", re.MULTILINE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PIPELINE_KEYS = {"timeout", "parallelism", "env", "image", "setup", "network", "steps"}
_STEP_KEYS = {"name", "run", "needs", "timeout", "allow_failure", "env", "fork_from", "teardown"}


@dataclass(frozen=True)
class EnvVar:
    """One environment variable a pipeline or step sets: a literal, or read from ccci's environment."""

    name: str
    value: str | None = None
    from_env: str | None = None
    secret: bool = False

    def resolve(self, host_env: Mapping[str, str], where: str) -> str:
        """Return the value, reading ``from_env`` from ``host_env``; SpecError if it is missing."""
        if self.from_env is None:
            return self.value or ""
        if self.from_env not in host_env:
            raise SpecError(f"{where}: env {self.name}: from_env {self.from_env} is not set")
        value = host_env[self.from_env]
        if self.secret and len(value) < MIN_SECRET:
            raise SpecError(f"{where}: env {self.name}: secret shorter than {MIN_SECRET} characters")
        return value


@dataclass(frozen=True)
class Step:
    """One command of a Pipeline, with its place in the graph; what happened to it is a StepResult."""

    name: str
    run: str
    needs: tuple[str, ...] = ()
    timeout: float | None = None
    allow_failure: bool = False
    env: tuple[EnvVar, ...] = ()
    fork_from: str | None = None
    teardown: bool = False
    # Where each key was written in ci.yml, for errors found after parsing (the graph checks).
    where: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Pipeline:
    """A validated ci.yml: run-wide settings and an acyclic graph of Steps, in declaration order.

    ``image`` and ``setup`` are for the VM executor: the machine image (``docker`` unless the file
    says otherwise), and a command run once in the warm base every fork starts from (cached by
    image + setup, so later runs skip it).
    The process sandbox has no base to prepare; it ignores both, and the report says so.
    ``network``: steps in the process sandbox get the host's network only when it is true (a
    QEMU fork always has its own private user-mode network).
    """

    path: Path
    steps: tuple[Step, ...]
    timeout: float = DEFAULT_TIMEOUT
    parallelism: int = DEFAULT_PARALLELISM
    image: str = DEFAULT_IMAGE
    setup: str | None = None
    env: tuple[EnvVar, ...] = ()
    network: bool = False  # process sandbox: share the host's network (abra must reach its servers)

    @property
    def label(self) -> str:
        """Return how errors name this file: ``<recipe>/ci.yml``, relative to RECIPES_DIR."""
        return label_of(self.path)

    @property
    def uses_abra(self) -> bool:
        """Whether a step (or the setup) runs the ``abra`` command: the machine must have abra then."""
        return any(_ABRA_COMMAND.search(text) for text in (self.setup or "", *(s.run for s in self.steps)))

    def step(self, name: str) -> Step:
        """Return the step called ``name``."""
        return next(s for s in self.steps if s.name == name)

    def resolve_env(self, host_env: Mapping[str, str] | None = None) -> tuple[dict[str, dict[str, str]], list[str]]:
        """Resolve every step's own environment (pipeline env < step env) and collect secret values."""
        host_env = os.environ if host_env is None else host_env
        secrets: list[str] = []
        base: dict[str, str] = {}
        for var in self.env:
            base[var.name] = var.resolve(host_env, f"{self.label}: env")
            if var.secret:
                secrets.append(base[var.name])
        per_step: dict[str, dict[str, str]] = {}
        for step in self.steps:
            env = dict(base)
            for var in step.env:
                env[var.name] = var.resolve(host_env, f"{self.label}: step {step.name}")
                if var.secret:
                    secrets.append(env[var.name])
            per_step[step.name] = env
        return per_step, secrets


def load_pipeline(path: Path | str) -> Pipeline:
    """Read and validate the ci.yml at ``path``; raise SpecError naming the file, line, step and key."""
    path = Path(path)
    return parse_pipeline(read_yaml(path), path)


def parse_pipeline(data: Any, path: Path) -> Pipeline:
    """Validate already-parsed ci.yml data into a Pipeline."""
    label = label_of(path)
    if not isinstance(data, dict):
        raise SpecError(f"{_at(label, _mark(data))}: the top level must be a mapping with a 'steps' list")

    def at(key: str | None = None) -> str:
        return _at(label, _mark(data, key))

    _no_unknown(data, _PIPELINE_KEYS, at)
    if not isinstance(data.get("steps"), list) or not data["steps"]:
        raise SpecError(f"{at('steps')}: key 'steps': must be a non-empty list")
    items = data["steps"]
    item_marks = getattr(items, "marks", [None] * len(items))
    steps = tuple(_parse_step(raw, i, label, item_marks[i]) for i, raw in enumerate(items))
    pipeline = Pipeline(
        path=path,
        steps=steps,
        timeout=_seconds(data.get("timeout", DEFAULT_TIMEOUT), f"{at('timeout')}: key 'timeout'"),
        parallelism=_count(data.get("parallelism", DEFAULT_PARALLELISM), f"{at('parallelism')}: key 'parallelism'"),
        image=_text(data.get("image", DEFAULT_IMAGE), f"{at('image')}: key 'image'") or DEFAULT_IMAGE,
        setup=_optional_text(data.get("setup"), f"{at('setup')}: key 'setup'"),
        env=_env(data.get("env", {}), f"{at('env')}: key 'env'"),
        network=_flag(data.get("network", False), f"{at('network')}: key 'network'"),
    )
    _check_graph(pipeline)
    return pipeline


def _parse_step(raw: Any, index: int, label: str, mark: Any) -> Step:
    if not isinstance(raw, dict):
        raise SpecError(f"{_at(label, mark)}: step #{index + 1}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        where = f"{_at(label, _mark(raw, 'name') or mark)}: step #{index + 1}"
        raise SpecError(f"{where}: key 'name': must match [A-Za-z0-9_.-]+, got {name!r}")

    def at(key: str | None = None) -> str:
        return f"{_at(label, _mark(raw, key) or mark)}: step {name}"

    _no_unknown(raw, _STEP_KEYS, at)
    needs = raw.get("needs", [])
    if isinstance(needs, str):
        needs = [needs]
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise SpecError(f"{at('needs')}: key 'needs': must be a list of step names")
    if len(set(needs)) != len(needs):
        raise SpecError(f"{at('needs')}: key 'needs': lists a step twice")
    timeout = raw.get("timeout")
    teardown = _flag(raw.get("teardown", False), f"{at('teardown')}: key 'teardown'")
    if timeout is None and teardown:
        timeout = TEARDOWN_TIMEOUT
    return Step(
        name=name,
        run=_text(raw.get("run"), f"{at('run')}: key 'run'"),
        needs=tuple(needs),
        timeout=None if timeout is None else _seconds(timeout, f"{at('timeout')}: key 'timeout'"),
        allow_failure=_flag(raw.get("allow_failure", False), f"{at('allow_failure')}: key 'allow_failure'"),
        env=_env(raw.get("env", {}), f"{at('env')}: key 'env'"),
        fork_from=_optional_text(raw.get("fork_from"), f"{at('fork_from')}: key 'fork_from'"),
        teardown=teardown,
        where={key: at(key) for key in ("", "name", "needs", "fork_from")},
    )


def _check_graph(pipeline: Pipeline) -> None:
    def at(step: Step, key: str) -> str:
        return step.where.get(key) or step.where.get("") or f"{pipeline.label}: step {step.name}"

    by_name: dict[str, Step] = {}
    for step in pipeline.steps:
        if step.name in by_name:
            raise SpecError(f"{at(step, 'name')}: key 'name': duplicate step name")
        by_name[step.name] = step
    for step in pipeline.steps:
        where = at(step, "needs")
        for need in step.needs:
            if need not in by_name:
                raise SpecError(f"{where}: key 'needs': no step is called {need!r}")
            if need == step.name:
                raise SpecError(f"{where}: key 'needs': a step cannot need itself")
            if by_name[need].teardown and not step.teardown:
                raise SpecError(f"{where}: key 'needs': {need!r} is a teardown step, which runs last")
            if step.teardown and not by_name[need].teardown:
                raise SpecError(f"{where}: key 'needs': a teardown step may only need teardown steps")
        if step.fork_from is not None:
            where = at(step, "fork_from")
            if step.fork_from not in step.needs:
                raise SpecError(f"{where}: key 'fork_from': {step.fork_from!r} must also be in needs")
            if step.teardown:
                raise SpecError(f"{where}: key 'fork_from': teardown steps run in the run's own machine")
    cycle = _find_cycle(by_name)
    if cycle:
        raise SpecError(f"{at(by_name[cycle[0]], 'needs')}: key 'needs': cycle {' -> '.join(cycle)}")


def _find_cycle(by_name: dict[str, Step]) -> list[str]:
    """Return one cycle as a path of names (first == last), or [] if the graph is acyclic."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for need in by_name[name].needs:
            if state.get(need) == 1:
                return path[path.index(need) :] + [need]
            if need not in state:
                found = visit(need)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return []

    for name in by_name:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return []


def _no_unknown(raw: dict, allowed: set[str], at: Any) -> None:
    """Refuse the first unknown key; ``at(key)`` says where, or ``at`` is that text already."""
    unknown = sorted((k for k in raw if k not in allowed), key=str)
    if unknown:
        where = at(unknown[0]) if callable(at) else at
        raise SpecError(f"{where}: key {str(unknown[0])!r}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {value!r}")
    return value


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SpecError(f"{where}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{where}: must be a whole number of at least 1, got {value!r}")
    return value


def _env(raw: Any, where: str) -> tuple[EnvVar, ...]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a mapping of NAME: value")
    out = []
    for name, value in raw.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise SpecError(f"{where}: {name!r} is not a variable name")
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            out.append(EnvVar(name, value=str(value)))
            continue
        if not isinstance(value, dict):
            raise SpecError(f"{where}: {name}: must be a string or {{value|from_env, secret}}, got {value!r}")
        _no_unknown(value, {"value", "from_env", "secret"}, f"{where}: {name}")
        if ("value" in value) == ("from_env" in value):
            raise SpecError(f"{where}: {name}: give exactly one of 'value' and 'from_env'")
        secret = _flag(value.get("secret", False), f"{where}: {name}: key 'secret'")
        if "from_env" in value:
            source = _text(value["from_env"], f"{where}: {name}: key 'from_env'")
            out.append(EnvVar(name, from_env=source, secret=secret))
        else:
            literal = value["value"]
            if not isinstance(literal, str | int | float) or isinstance(literal, bool):
                raise SpecError(f"{where}: {name}: key 'value': must be a string or number")
            if secret and len(str(literal)) < MIN_SECRET:
                raise SpecError(f"{where}: {name}: secret shorter than {MIN_SECRET} characters")
            out.append(EnvVar(name, value=str(literal), secret=secret))
    return tuple(out)
