"""Think tags: asking a non-reasoning model to think, finding an open thought, splitting thought/answer.

The thinking-token budget itself lives in `Engine.chat` (two-phase generation): phase 1 generates up to
`budget_tokens`; if the thought is still open, `force_close_text + close_tag` is appended and phase 2
continues to the answer within the remaining `max_new_tokens`.
"""

from __future__ import annotations

from typing import Any

THINK_INSTRUCTION = (
    "Before answering, think step by step inside {open} and {close}. "
    "Then give your final answer after {close}."
)


def _tag(cfg: Any, name: str, default: str) -> str:
    return getattr(cfg, name, default) if cfg is not None else default


def ask_to_think(messages: list[dict], cfg: Any) -> list[dict]:
    """Add the think-inside-the-tags instruction to the system turn (a new one if there is none)."""
    note = THINK_INSTRUCTION.format(open=_tag(cfg, "open_tag", "<think>"), close=_tag(cfg, "close_tag", "</think>"))
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content'].rstrip()}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def thought_open(text: str, cfg: Any) -> bool:
    """True when the last open tag in `text` has no close tag after it."""
    open_tag, close_tag = _tag(cfg, "open_tag", "<think>"), _tag(cfg, "close_tag", "</think>")
    return text.rfind(open_tag) > text.rfind(close_tag)


def split_thought(text: str, cfg: Any) -> tuple[str | None, str]:
    """(thought, answer). A thought runs from the open tag (or the start, for templates that open it in
    the prompt) to the close tag; no close tag -> (None, text) if there is no open tag either, else
    (rest, "") — a thought truncated by the length limit has no answer."""
    open_tag, close_tag = _tag(cfg, "open_tag", "<think>"), _tag(cfg, "close_tag", "</think>")
    close = text.find(close_tag)
    start = text.find(open_tag)
    if close >= 0 and (start < 0 or start < close):
        begin = start + len(open_tag) if start >= 0 else 0
        return text[begin:close].strip(), text[close + len(close_tag):].strip()
    if start >= 0:
        return text[start + len(open_tag):].strip(), ""
    return None, text.strip()
