"""A YAML file read for people: every key keeps its line and column, duplicate keys are refused.

ci.yml errors are published on the PR, so they must point at the place in the file as a person
sees it — ``hello/ci.yml, line 4, column 5`` — never at the server's path or PyYAML's
``"<unicode string>"``, and a syntax error keeps PyYAML's caret diagnostic on lines of its own.
Mappings and sequences come back as ``dict``/``list`` subclasses carrying the marks of their keys
and items, which ``mark_of`` reads; plain data (built in code) simply has none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecError


def label_of(path: Path) -> str:
    """Return ``<recipe>/ci.yml`` for a ci.yml at RECIPES_DIR/<recipe>/ci.yml (or any <dir>/ci.yml)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


class _Map(dict):
    """A YAML mapping that remembers where it and each of its keys were written."""

    mark: Any = None
    marks: dict[Any, Any]


class _Seq(list):
    """A YAML sequence that remembers where it and each of its items were written."""

    mark: Any = None
    marks: list[Any]


class _Problem(Exception):
    """A problem found while loading, at a place in the file."""

    def __init__(self, problem: str, mark: Any):
        super().__init__(problem)
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """A SafeLoader that keeps line and column of every key and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # merge keys (<<) first, so that only real keys are checked
        marks: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in marks:
                raise _Problem(f"duplicate key {key!r}", key_node.start_mark)
            marks[key] = key_node.start_mark
        mapping = _Map(super().construct_mapping(node, deep=deep))
        mapping.mark, mapping.marks = node.start_mark, marks
        return mapping


def _construct_map(loader: _Loader, node):
    data = _Map()
    yield data
    value = loader.construct_mapping(node)
    data.update(value)
    data.mark, data.marks = value.mark, value.marks


def _construct_seq(loader: _Loader, node):
    data = _Seq()
    yield data
    data.extend(loader.construct_sequence(node))
    data.mark, data.marks = node.start_mark, [item.start_mark for item in node.value]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def at(label: str, mark: Any) -> str:
    """Return ``label, line L, column C`` (1-based), or the label alone without a mark."""
    return f"{label}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else label


def mark_of(data: Any, key: Any = None) -> Any:
    """Return where ``key`` of a loaded mapping was written, else where the mapping starts."""
    marks = getattr(data, "marks", None)
    if key is not None and isinstance(marks, dict) and key in marks:
        return marks[key]
    return getattr(data, "mark", None)


def read_yaml(path: Path) -> Any:
    """Read the YAML file at ``path``; raise SpecError saying where and what is wrong."""
    label = label_of(path)
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader subclass
    except OSError as exc:
        raise SpecError(f"{label}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{label}: not valid YAML: the file is not UTF-8 text") from None
    except _Problem as exc:
        raise SpecError(f"{at(label, exc.mark)}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_problem(label, exc)) from None


def _yaml_problem(label: str, exc: yaml.YAMLError) -> str:
    """Say what PyYAML found wrong, where, with its caret diagnostic on lines of its own."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None or mark is None:  # e.g. a character YAML does not allow
        return f"{label}: not valid YAML: " + str(exc).replace('"<unicode string>"', label)
    text = f"{at(label, mark)}: not valid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        where = f" (line {context_mark.line + 1}, column {context_mark.column + 1})" if context_mark else ""
        text += f", {context}{where}"
    snippet = mark.get_snippet()
    return f"{text}\n{snippet}" if snippet else text
