"""The prompt of the code foundry, rendered in one place.

GenN serves it to a generator and the CFR builder renders it again from the archived log
(`projections/cfr.py`); both call `render_user`, so the prompt a model was trained on is
byte-identical to the one it is served (a test checks it end to end through the archive).
Light on purpose (json only): the GenN process imports it without pyarrow or DuckDB.

    system:  SYSTEM_PROMPT
    user:    Context: (domain, gear, intent, params, why) + Task: (the proposal's `prompt`)
"""

from __future__ import annotations

import json
from typing import Any, Mapping

SYSTEM_PROMPT = (
    "You write Python for SCF, a control loop that optimises physical energy systems. "
    "Answer with code only. The code must pass the safety gate: no network access, no "
    "filesystem access, no subprocesses, and it must respect the domain's physical limits."
)
DEFAULT_TASK = "Write the Python code this intent asks for."


def canonical_params(params: Mapping[str, Any] | str | None) -> str:
    """The intent's params as the prompt shows them: sorted JSON (a JSON string is re-encoded)."""
    if params is None:
        return "{}"
    if isinstance(params, str):
        try:
            params = json.loads(params or "{}")
        except (TypeError, ValueError):
            return params
    return json.dumps(params, sort_keys=True, separators=(", ", ": "))


def render_user(
    *,
    domain: str | None,
    gear: str | None,
    kind: str | None,
    hypothesis: int | None,
    params: Mapping[str, Any] | str | None,
    reason: str | None,
    task: str | None,
    language: str | None = "python",
) -> str:
    """The user turn: the context and the intent, then the task."""
    lines = [
        "Context:",
        f"- domain: {domain or 'unknown'}",
        f"- gear: {gear or 'STANDARD'}",
        f"- intent: {kind or 'codegen'} (hypothesis {hypothesis or 0})",
        f"- params: {canonical_params(params)}",
    ]
    if reason:
        lines.append(f"- why: {reason}")
    lines += ["", "Task:", (task or DEFAULT_TASK).strip()]
    lang = language or "python"
    if lang != "python":
        lines.append(f"(language: {lang})")
    return "\n".join(lines)


def render_row(row: Mapping[str, Any]) -> str:
    """`render_user` from a row of the `cfr` view."""
    return render_user(
        domain=row.get("domain"), gear=row.get("gear"), kind=row.get("kind"), hypothesis=row.get("hypothesis"),
        params=row.get("params"), reason=row.get("intent_reason"), task=row.get("prompt"), language=row.get("language"),
    )


def messages(user: str) -> list[dict[str, str]]:
    """The prompt as chat messages (what an OpenAI-compatible endpoint and a chat template get)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


__all__ = ["SYSTEM_PROMPT", "DEFAULT_TASK", "canonical_params", "render_user", "render_row", "messages"]
