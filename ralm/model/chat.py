"""Where the audio goes in the LLM's own chat template.

The audio block (start embedding, audio tokens, end embedding) is placed first inside the user turn;
everything around it comes from the tokenizer's chat template, rendered once with a sentinel and split:

    prefix  = [system turn if any] + user-turn header        (constant, token ids)
    <start> audio <end>                                         (embeddings)
    suffix  = separator + question + end of turn + generation prompt   (token ids per question)
    target  = the response (thinking included), no EOS appended       (token ids, the only labels)

At train time ALARM uses no system prompt, so a template's *default* system turn (SmolLM2 adds one) is
dropped too: the user-turn header is recovered by rendering a two-turn conversation.

A served conversation (`Dialogue`: earlier turns, the clip in one user turn, follow-up questions) keeps
that layout around the audio: the same prefix, the audio first inside its user turn, and the rest of the
conversation rendered by the template; a single question lays out exactly as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

SENTINEL = "\u2063RALM_AUDIO\u2063"
FIRST_TURN = "\u2063RALM_TURN\u2063"  # marks where the first user turn's content starts


def check_turns(roles: Sequence[str]) -> None:
    """A conversation's non-system roles: user and assistant turns, user first and last (ValueError)."""
    if not roles or roles[0] != "user" or roles[-1] != "user" or set(roles) - {"user", "assistant"}:
        raise ValueError(f"send user and assistant messages, user first and last (got roles {list(roles)})")


@dataclass(frozen=True)
class Dialogue:
    """A conversation about one clip: its non-system turns as (role, text), user first and last, the
    audio (if any) at the start of user turn `audio_turn`."""

    turns: tuple[tuple[str, str], ...]
    audio_turn: int = 0

    def __post_init__(self) -> None:
        roles = [r for r, _ in self.turns]
        check_turns(roles)
        if not 0 <= self.audio_turn < len(roles) or roles[self.audio_turn] != "user":
            raise ValueError(f"the audio must be in a user turn (turn {self.audio_turn} of {roles})")


Question = str | Dialogue  # one user question (as trained) or a conversation


class ChatLayout:
    def __init__(self, tokenizer: Any, system_prompt: str | None = None, separator: str = "\n\n"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the LLM's tokenizer has no chat template; ralm places audio inside its user turn")
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.separator = separator

    def _render(self, messages: list[dict[str, str]], gen: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    @cached_property
    def prefix_text(self) -> str:
        if self.system_prompt:
            full = self._render([*self._system(), {"role": "user", "content": SENTINEL}], gen=False)
            return full[: full.index(SENTINEL)]
        # No system turn: the user header is what a second user turn adds before its content.
        one = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        base = self._render(one, gen=False)
        two = self._render([*one, {"role": "user", "content": SENTINEL}], gen=False)
        if not two.startswith(base):
            raise ValueError("cannot locate the user-turn header in this chat template; set a system prompt")
        header = two[len(base): two.index(SENTINEL)]
        first = self._render([{"role": "user", "content": SENTINEL}], gen=False)
        bos = self.tok.bos_token or ""
        # Templates that open the whole conversation with BOS (Llama 3) keep it.
        lead = bos if bos and first.startswith(bos) and not header.startswith(bos) else ""
        return lead + header

    @cached_property
    def prefix_ids(self) -> list[int]:
        return self.ids(self.prefix_text)

    def suffix_text(self, question: str) -> str:
        full = self._render([*self._system(), {"role": "user", "content": SENTINEL + self.separator + question}],
                            gen=True)
        return full[full.index(SENTINEL) + len(SENTINEL):]

    def suffix_ids(self, question: str) -> list[int]:
        return self.ids(self.suffix_text(question))

    def target_ids(self, target: str, question: str = "") -> list[int]:
        # A generation prompt that already opens the thought (`<think>\n`) must not be repeated by the target.
        tail = self.suffix_text(question)[-32:]
        for k in range(len(tail), 0, -1):
            if tail[-k:].strip() and target.startswith(tail[-k:]):
                target = target[k:]
                break
        return self.ids(target)

    def text_prompt_ids(self, question: Question) -> list[int]:
        """The plain chat prompt of a text-only question, exactly as the frozen LLM would get it."""
        turns: Sequence[tuple[str, str]] = (("user", question),) if isinstance(question, str) else question.turns
        return self.ids(self._render([*self._system(), *({"role": r, "content": t} for r, t in turns)], gen=True))

    def around_audio(self, question: Question) -> tuple[list[int], list[int]]:
        """The token ids before and after the audio block."""
        if isinstance(question, str):
            return self.prefix_ids, self.suffix_ids(question)
        messages = [{"role": role, "content": SENTINEL + self.separator + text if i == question.audio_turn else text}
                    for i, (role, text) in enumerate(question.turns)]
        messages[0]["content"] = FIRST_TURN + messages[0]["content"]
        full = self._render([*self._system(), *messages], gen=True)
        first, audio = full.index(FIRST_TURN) + len(FIRST_TURN), full.index(SENTINEL)
        # The first user turn's header is the trained prefix (which drops a template's default system turn).
        return self.ids(self.prefix_text + full[first:audio]), self.ids(full[audio + len(SENTINEL):])
