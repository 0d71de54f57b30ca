"""The PR comment: one Markdown comment per run, edited in place from queued to the final report.

Every version carries the hidden marker ``<!-- ccci:run=<id> -->`` by which the reporter finds
the comment again, and links the run page, its log and the tested commit. The final version
shows the verdict, recipe, short sha and duration, a step table (status, duration, metrics;
⚠️ for a step allowed to fail that did), notes, and the last lines of the failing step's output
in a ``<details>`` block (``excerpt``: stderr first). It always fits in ``limit`` characters
(the forge's comment size is bounded): the failing output is cut from its head, keeping its
tail, then, if still needed, table rows are dropped. Reports are redacted before they get here.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..names import is_sha
from .report import Report, StepResult

EMOJI = {
    "passed": "✅",
    "failed": "❌",
    "error": "💥",
    "canceled": "🚫",
    "timed_out": "⏱️",
    "skipped": "⏭️",
    "queued": "⏳",
    "running": "🔄",
}
ALLOWED_FAILURE = "⚠️"  # a step that may fail did: not the run's ❌
TAIL_LINES = 60
LIMIT = 60000


def marker(run_id: str | int) -> str:
    """Return the hidden marker that identifies the run's comment."""
    return f"<!-- ccci:run={run_id} -->"


def duration(ms: int | None) -> str:
    """Format milliseconds for people: 850 ms, 12.3 s, 4 min 05 s."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms // 60_000} min {ms // 1000 % 60:02d} s"


MODES = {
    "fork": "Ran in a VM fork: the app was deployed to the fork's own swarm, and nothing outside it was touched.",
    "host": "Ran on the host: the app was deployed to the operator's abra server, under the app's lock.",
}


def render_comment(
    report: Report,
    *,
    marker_run_id: str | int,
    public_url: str = "",
    tested_sha: str,
    head_sha: str | None = None,
    repo_url: str = "",
    limit: int = LIMIT,
) -> str:
    """Render the final report comment, always shorter than ``limit`` characters.

    ``repo_url`` is the repository's web page (``forge.repo_web_url``): with it, the tested
    commit links to its page.
    """
    head = [
        marker(marker_run_id),
        f"### {EMOJI[report.status]} {report.status.replace('_', ' ')} — `{_cell(report.recipe)}` "
        f"at {_commit(tested_sha, repo_url)} in {duration(report.total_ms)}",
        "",
    ]
    if head_sha and head_sha != tested_sha:
        head += [
            f"> ⚠️ Stale: the pull request head moved to `{head_sha[:10]}` after this run tested "
            f"`{tested_sha[:10]}`. Trigger a new run to test it.",
            "",
        ]
    rows = [_row(s) for s in report.steps]
    foot = [_note(n) for n in report.notes]
    if report.mode:
        foot.append(f"<sub>{MODES.get(report.mode, report.mode)}</sub>")
    if public_url:
        foot += ["", _links(public_url, marker_run_id, "Full log")]
    failing = report.failing_step()
    while True:
        text = _assemble(head, rows, foot, "")
        budget = limit - len(text) - 400  # room for the <details> wrapper and a "more steps" row
        if budget > 200 or not rows:
            break
        rows = rows[: len(rows) // 2]  # absurd step tables: keep the first half and say so
    dropped = len(report.steps) - len(rows)
    if dropped:
        rows.append(f"| | … {dropped} more steps, see the full log | | | |")
    details = _details(failing, budget) if failing and budget > 0 else ""
    text = _assemble(head, rows, foot, details)
    return text if len(text) < limit else text[: limit - 1]  # only reachable with a tiny limit


def render_progress(
    state: str,
    *,
    marker_run_id: str | int,
    recipe: str,
    tested_sha: str,
    position: int | None = None,
    steps: Iterable[tuple[str, str, int | None]] = (),
    public_url: str = "",
    repo_url: str = "",
    limit: int = LIMIT,
) -> str:
    """Render the comment of a queued (with its position) or running run (with live step states)."""
    at = _commit(tested_sha, repo_url)
    if state == "queued":
        where = f", position {position} in the queue" if position else ""
        title = f"### {EMOJI['queued']} queued{where} — `{_cell(recipe)}` at {at}"
    else:
        title = f"### {EMOJI['running']} running — `{_cell(recipe)}` at {at}"
    rows = [f"| {EMOJI.get(st, '')} | {_cell(n)} | {st.replace('_', ' ')} | {duration(ms)} | |" for n, st, ms in steps]
    foot = [_links(public_url, marker_run_id, "Live log")] if public_url else []
    text = _assemble([marker(marker_run_id), title, ""], rows, foot, "")
    return text if len(text) < limit else text[: limit - 1]


def _assemble(head: list[str], rows: list[str], foot: list[str], details: str) -> str:
    table = ["| | Step | Status | Duration | Metrics |", "|---|---|---|---|---|", *rows] if rows else []
    parts = [*head, *table, ""]
    if details:
        parts += [details, ""]
    parts += foot
    return "\n".join(parts).rstrip() + "\n"


def _commit(sha: str, repo_url: str) -> str:
    """Return the short sha as code, linked to the commit's page when the repository's is known."""
    short = f"`{sha[:10]}`"
    return f"[{short}]({repo_url}/commit/{sha})" if repo_url and is_sha(sha) else short


def _links(public_url: str, run_id: str | int, log_name: str) -> str:
    base = f"{public_url.rstrip('/')}/runs/{run_id}"
    return f"[Run page]({base}) · [{log_name}]({base}/log)"


def _row(step: StepResult) -> str:
    metrics = ", ".join(f"{k}={v}" for k, v in step.metrics.items())
    allowed = step.allow_failure and step.status != "passed"
    status = step.status.replace("_", " ") + (" (allowed)" if allowed else "")
    emoji = ALLOWED_FAILURE if allowed and step.status in ("failed", "timed_out", "error") else EMOJI[step.status]
    when = "" if step.status in ("skipped", "canceled") and not step.duration_ms else duration(step.duration_ms)
    return f"| {emoji} | {_cell(step.name)} | {status} | {when} | {_cell(metrics)} |"


def _note(text: str) -> str:
    """Render a note as a list item; lines after its first (a YAML caret diagnostic) as code below it."""
    first, _, rest = text.rstrip().partition("\n")
    item = f"- {_cell(first)}"
    if rest.strip():
        fence = "`" * max(3, _longest_backtick_run(rest) + 1)
        block = f"{fence}text\n{rest}\n{fence}"
        item += "\n\n" + "\n".join("  " + line if line else "" for line in block.split("\n"))
    return item


def excerpt(step: StepResult) -> list[tuple[str, str]]:
    """Return the last lines of a step's output as (stream, text), the real error first.

    stderr comes before stdout: a failing command says why on stderr, and a reader should not
    have to scroll past a screen of progress output to find it. The PR comment and ``ccci test``
    show this same excerpt.
    """
    streams = (("stderr", step.stderr), ("stdout", step.stdout))
    return [(name, _tail(text)) for name, text in streams if text.strip()]


def _details(step: StepResult, budget: int) -> str:
    code = "" if step.exit_code is None else f", exit {step.exit_code}"
    parts = excerpt(step)
    if not parts:
        return ""
    share = budget // len(parts)
    blocks = []
    for name, text in parts:
        if len(text) > share - 40:
            text = "…\n" + text[-max(share - 60, 0) :]
        fence = "`" * max(3, _longest_backtick_run(text) + 1)
        blocks.append(f"{name}:\n\n{fence}text\n{text.rstrip()}\n{fence}")
    summary = (
        f"<summary>Last lines of <code>{_html(step.name)}</code> ({step.status.replace('_', ' ')}{code})</summary>"
    )
    return "<details>" + summary + "\n\n" + "\n\n".join(blocks) + "\n</details>"


def _tail(text: str) -> str:
    lines = text.rstrip("\n").split("\n")
    return "\n".join(lines[-TAIL_LINES:])


def _longest_backtick_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def _cell(text: str) -> str:
    """Make text safe inside a table cell or heading: no pipes, no newlines, no HTML."""
    return _html(str(text)).replace("|", "\\|").replace("\n", " ")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
