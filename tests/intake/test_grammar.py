"""The `!testme` grammar, row by row: commands, replies and everything that must not trigger."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccci.intake.grammar import Command, Ignore, Reply, command_lines, parse_comment, usage

TEST = Command("test")
CANCEL = Command("cancel")
REPLY = Reply(usage("!testme"))
IGNORE = Ignore()

ROWS = [
    # plain commands
    ("bare trigger", "!testme", TEST),
    ("trailing newline", "!testme\n", TEST),
    ("surrounding spaces", "   !testme   ", TEST),
    ("tab after", "!testme\t", TEST),
    ("three-space indent", "   !testme", TEST),
    ("cancel", "!testme cancel", CANCEL),
    ("cancel with extra spaces", "  !testme    cancel  ", CANCEL),
    ("cancel tab separated", "!testme\tcancel", CANCEL),
    ("trigger among prose lines", "Thanks for the fix!\n\n!testme\n\nLet's see.", TEST),
    ("trigger after a paragraph", "looks good\n!testme", TEST),
    ("trigger then closing words on next line", "!testme\nplease", TEST),
    # case: decided case-insensitive, like Prow
    ("capitalised by a phone", "!Testme", TEST),
    ("upper case", "!TESTME", TEST),
    ("upper case cancel", "!TESTME CANCEL", CANCEL),
    # line endings
    ("CRLF", "hello\r\n!testme\r\nbye\r\n", TEST),
    ("CRLF cancel", "!testme cancel\r\n", CANCEL),
    ("old mac CR", "hello\r!testme\r", TEST),
    ("CRLF fence hides", "```\r\n!testme\r\n```\r\n", IGNORE),
    # unicode whitespace and invisible characters
    ("NBSP before", "\u00a0!testme", TEST),
    ("NBSP after", "!testme\u00a0", TEST),
    ("em space between", "!testme\u2003cancel", CANCEL),
    ("ideographic space after", "!testme\u3000", TEST),
    ("zero-width space after", "!testme\u200b", TEST),
    ("byte order mark before", "\ufeff!testme", TEST),
    ("zero-width joiner glued to word", "!test\u200dme", IGNORE),
    # near misses
    ("suffix letters", "!testmexyz", IGNORE),
    ("suffix bang", "!testme!", IGNORE),
    ("suffix period", "!testme.", IGNORE),
    ("prefix word", "foo !testme", IGNORE),
    ("prefix word cancel", "please !testme cancel", IGNORE),
    ("inline code", "`!testme`", IGNORE),
    ("inline code in prose", "run `!testme` to test", IGNORE),
    ("bold", "**!testme**", IGNORE),
    ("no bang", "testme", IGNORE),
    ("double bang", "!!testme", IGNORE),
    ("missing letter", "!testm", IGNORE),
    ("slash form", "/testme", IGNORE),
    ("list item", "- !testme", IGNORE),
    ("empty", "", IGNORE),
    ("only whitespace", " \n\t\n", IGNORE),
    ("cancel glued", "!testmecancel", IGNORE),
    # malformed uses of the trigger get the usage reply
    ("unknown subcommand", "!testme please", REPLY),
    ("flag", "!testme --quick", REPLY),
    ("help", "!testme help", REPLY),
    ("cancel with extra", "!testme cancel now", REPLY),
    ("cancel typo", "!testme cancle", REPLY),
    # quotes
    ("quoted", "> !testme", IGNORE),
    ("quoted without space", ">!testme", IGNORE),
    ("nested quote", "> > !testme", IGNORE),
    ("nested quote tight", ">> !testme", IGNORE),
    ("quote with leading spaces", "  > !testme", IGNORE),
    ("quoted cancel", "> !testme cancel", IGNORE),
    ("quoted reply", "> !testme foo", IGNORE),
    ("quote then real command", "> !testme cancel\n\n!testme", TEST),
    ("quoted, reply text after", "> did you !testme?\n> !testme\nyes I did", IGNORE),
    # fenced code
    ("backtick fence", "```\n!testme\n```", IGNORE),
    ("tilde fence", "~~~\n!testme\n~~~", IGNORE),
    ("fence with info string", "```sh\n!testme\n```", IGNORE),
    ("fence with spaced info string", "``` shell session\n!testme\n```", IGNORE),
    ("indented fence", "   ```\n!testme\n   ```", IGNORE),
    ("long fence, short close stays open", "````\n```\n!testme\n````", IGNORE),
    ("tilde fence not closed by backticks", "~~~\n```\n!testme\n~~~", IGNORE),
    ("unclosed fence runs to the end", "```\n!testme", IGNORE),
    ("command after closed fence", "```\ncode\n```\n!testme", TEST),
    ("command after closed tilde fence", "~~~~ yaml\nx: 1\n~~~~~\n!testme cancel", CANCEL),
    ("closing fence with trailing spaces", "```\n!testme\n```   \n!testme cancel", CANCEL),
    ("closing fence may not carry text", "```\n```not a close\n!testme\n```", IGNORE),
    ("backticks in info string is inline code", "```x```\n!testme", TEST),
    ("four-space fence is code, not a fence", "    ```\n!testme", TEST),
    # indented code and HTML comments
    ("indented code block", "    !testme", IGNORE),
    ("tab-indented code block", "\t!testme", IGNORE),
    ("html comment block", "<!--\n!testme\n-->", IGNORE),
    ("html comment one line", "<!-- !testme -->", IGNORE),
    ("command after html comment", "<!-- note -->\n!testme", TEST),
    ("command after multi-line html comment", "<!--\nhidden\n-->\n!testme", TEST),
    # edited-looking comments
    ("struck through", "~~!testme~~", IGNORE),
    ("edit note then command", "EDIT: retrying\n!testme", TEST),
    ("command then edit note", "!testme\n\n_edited: typo_", TEST),
    # several commands
    ("cancel wins over test", "!testme\n!testme cancel", CANCEL),
    ("cancel wins over test, reversed", "!testme cancel\n!testme", CANCEL),
    ("repeated test is one test", "!testme\n!testme\n!testme", TEST),
    ("command wins over malformed", "!testme foo\n!testme", TEST),
    ("cancel wins over malformed", "!testme cancel\n!testme foo", CANCEL),
    ("two malformed lines, one reply", "!testme a\n!testme b", REPLY),
]


@pytest.mark.parametrize(("body", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_parse_comment(body, expected):
    assert parse_comment(body) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!ci", Command("test")),
        ("!ci cancel", Command("cancel")),
        ("!testme", Ignore()),
        ("!ci go", Reply(usage("!ci"))),
    ],
)
def test_custom_trigger(body, expected):
    assert parse_comment(body, trigger="!ci") == expected


def test_usage_names_both_forms():
    text = usage("!ci")
    assert "`!ci`" in text and "`!ci cancel`" in text


def test_command_lines_drops_code_quotes_and_comments():
    body = "a\n> b\n```\nc\n```\n<!--\nd\n-->\n    e\nf"
    assert command_lines(body) == ["a", "f"]


# -- properties over arbitrary comments ------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
TRIGGERISH = st.lists(
    st.sampled_from(["!testme", "!testme cancel", "!TESTME", "!testme foo", "```", "~~~", "> ", "<!--", "-->", "\r\n"])
    | TEXT,
    max_size=12,
).map("\n".join)


def _lines(body):
    return body.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@settings(max_examples=300, deadline=None)
@given(TRIGGERISH)
def test_never_raises_and_returns_one_outcome(body):
    assert isinstance(parse_comment(body), (Ignore, Reply, Command))


@settings(max_examples=300, deadline=None)
@given(TRIGGERISH)
def test_quoting_a_whole_comment_silences_it(body):
    quoted = "\n".join("> " + line for line in _lines(body))
    assert parse_comment(quoted) == Ignore()
    assert parse_comment(quoted + "\n!testme") == Command("test")


@settings(max_examples=300, deadline=None)
@given(TRIGGERISH)
def test_fencing_a_whole_comment_silences_it(body):
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    assert parse_comment(f"{fence}\n{body}\n{fence}") == Ignore()
