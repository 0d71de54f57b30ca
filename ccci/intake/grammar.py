"""The comment grammar: what a PR comment asks ccci to do.

A comment parses to exactly one of three outcomes (Atlantis' ``CommentParseResult``):

* ``Ignore``  — nothing for ccci here (no command line, or only near misses);
* ``Reply``   — the trigger was used but the rest of the line is not a command: answer with usage;
* ``Command`` — ``test`` (``!testme``) or ``cancel`` (``!testme cancel``).

Decisions, each a row in ``tests/intake/test_grammar.py``:

* A command is a line holding the trigger as its first word, with nothing before it but up to
  three spaces of indentation (four or more is a Markdown code block) and any whitespace
  around the words, Unicode whitespace and zero-width characters included.
* Lines inside fenced code blocks (backtick or tilde fences, with info strings, indented up to
  three spaces, closed by a fence of the same character at least as long; an unclosed fence
  runs to the end), inside ``>`` quotes (nested or indented) and inside ``<!-- … -->`` HTML
  comments (invisible when rendered) are never commands: quoting someone's ``!testme`` or
  pasting instructions must not start a run.
* The trigger and the subcommand match case-insensitively, as Prow's commands do: phone
  keyboards capitalise the first letter, and ``!TESTME`` can only mean one thing. The trigger
  must end at whitespace or the end of the line, so ``!testmexyz`` and ``!testme!`` are ignored.
* Several command lines in one comment: ``cancel`` wins over ``test`` (the conservative choice
  — it never starts work), and any command wins over a malformed ``!testme …`` line, which
  then gets no reply. Repeated ``!testme`` lines are one ``test``.
* Windows (``\\r\\n``) and old Mac (``\\r``) line endings read like ``\\n``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCE_OPEN = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_QUOTE = re.compile(r"^ {0,3}>")
_HTML_COMMENT_OPEN = re.compile(r"^ {0,3}<!--")
# str.split() already treats every Unicode space as a separator; these are not spaces to
# Python but are invisible, so a command pasted with them must still read as a command.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"
_SUBCOMMANDS = ("cancel",)


@dataclass(frozen=True)
class Ignore:
    """The comment asks nothing of ccci."""

    reason: str = "no command in the comment"


@dataclass(frozen=True)
class Reply:
    """The trigger was used wrongly: answer with ``text`` and do nothing else."""

    text: str


@dataclass(frozen=True)
class Command:
    """A well-formed command: ``name`` is ``"test"`` or ``"cancel"``."""

    name: str


ParseResult = Ignore | Reply | Command


def usage(trigger: str = "!testme") -> str:
    """Return the short usage text ccci replies with to a malformed command."""
    return (
        f"I did not understand that. Comment `{trigger}` on a line of its own to test this pull "
        f"request's head commit, or `{trigger} cancel` to cancel its running test."
    )


def parse_comment(body: str, trigger: str = "!testme") -> ParseResult:
    """Parse a PR comment into Ignore, Reply or Command."""
    wanted = trigger.lower()
    found: set[str] = set()
    malformed = False
    for line in command_lines(body):
        words = line.translate({ord(c): " " for c in _INVISIBLE}).split()
        if not words or words[0].lower() != wanted:
            continue
        rest = [w.lower() for w in words[1:]]
        if not rest:
            found.add("test")
        elif len(rest) == 1 and rest[0] in _SUBCOMMANDS:
            found.add(rest[0])
        else:
            malformed = True
    if "cancel" in found:
        return Command("cancel")
    if "test" in found:
        return Command("test")
    if malformed:
        return Reply(usage(trigger))
    return Ignore()


def command_lines(body: str) -> list[str]:
    """Return the lines of ``body`` that could hold a command: not code, not quoted, not hidden."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    fence = ""  # the opening fence while inside a fenced code block
    in_html_comment = False
    for line in lines:
        if fence:
            stripped = line.lstrip(" ")
            if (
                len(line) - len(stripped) <= 3
                and stripped.startswith(fence)
                and not stripped.rstrip(" \t").strip(fence[0])
            ):
                fence = ""
            continue
        if in_html_comment:
            in_html_comment = "-->" not in line
            continue
        opened = _FENCE_OPEN.match(line)
        # CommonMark: a backtick fence's info string may not contain a backtick (```x``` is inline code).
        if opened and not (opened["fence"][0] == "`" and "`" in opened["info"]):
            fence = opened["fence"]
            continue
        if _HTML_COMMENT_OPEN.match(line):
            in_html_comment = "-->" not in line.split("<!--", 1)[1]
            continue
        if _QUOTE.match(line) or _indent(line) >= 4:
            continue
        out.append(line)
    return out


def _indent(line: str) -> int:
    """Return the indentation of ``line`` in columns, a tab advancing to the next multiple of 4."""
    col = 0
    for ch in line:
        if ch == " ":
            col += 1
        elif ch == "\t":
            col += 4 - col % 4
        else:
            break
    return col
