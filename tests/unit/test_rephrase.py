"""Rephrasing: message format, tag renaming round trip, <answer> parsing, and the accept/retry/reject rules.

The decision tests drive `Rephraser` with a scripted backend (canned LLM outputs at the Backend interface)
because a tiny random model cannot produce an acceptable rewrite on purpose; the real engines are exercised
in tests/integration/test_selfgen.py.
"""

from __future__ import annotations

from ralm.config import RalmConfig
from ralm.llm.engines import Completion
from ralm.selfgen import prompting
from ralm.selfgen.audit import edit_ratio, word_edit_distance
from ralm.selfgen.backend import Backend
from ralm.selfgen.rephrase import Rephraser

OPEN, CLOSE, REN = "<think>", "</think>", "text_llm_reasoning"


def test_rename_and_restore_round_trip() -> None:
    text = "<think>The transcript says hi.</think>The speaker says hi."
    renamed = prompting.rename_think_tags(text, OPEN, CLOSE, REN)
    assert "<think>" not in renamed and f"<{REN}>" in renamed and f"</{REN}>" in renamed
    assert prompting.restore_think_tags(renamed, OPEN, CLOSE, REN) == text


def test_rephrase_messages_have_rules_few_shot_and_renamed_response() -> None:
    msgs = prompting.rephrase_messages("<think>x</think>y", OPEN, CLOSE, REN)
    assert msgs[0]["role"] == "system" and "<answer>" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(prompting.FEW_SHOT)
    assert all(m["content"].startswith("<answer>") for m in msgs[2:-1:2])
    assert f"<{REN}>x</{REN}>y" in msgs[-1]["content"] and "<think>" not in msgs[-1]["content"]


def test_extract_answer() -> None:
    assert prompting.extract_answer("blah <answer> I hear a bell. </answer> tail") == "I hear a bell."
    assert prompting.extract_answer("<answer>first</answer> then <answer>second</answer>") == "second"
    assert prompting.extract_answer("<answer>cut by the length limit") == "cut by the length limit"
    assert prompting.extract_answer("<answer>cut", require_close=True) is None
    assert prompting.extract_answer("Here's an edited version: I hear a bell.") is None
    assert prompting.extract_answer("<answer></answer>") is None
    out = prompting.parse_rephrase(f"<answer><{REN}>hm</{REN}>A bell.</answer>", OPEN, CLOSE, REN)
    assert out == "<think>hm</think>A bell."


def test_parse_proposals_and_yes_no() -> None:
    out = prompting.parse_proposals("1. What sound is this?\n- Is it loud?\nok\n2) What sound is this?\n"
                                    "Describe the pitch of the tone.")
    assert out == ["What sound is this?", "Is it loud?", "Describe the pitch of the tone."]
    assert prompting.parse_yes_no("Yes.") is True and prompting.parse_yes_no("no") is False
    assert prompting.parse_yes_no("maybe") is None


def test_word_edit_ratio() -> None:
    assert word_edit_distance("a b c".split(), "a x c".split()) == 1
    assert edit_ratio("the description says a bell", "I hear a bell") == 0.6
    assert edit_ratio("same words", "same words") == 0.0


# ---------------------------------------------------------------------------------------------- decisions
class Scripted(Backend):
    """Answers each request with the next canned text for its row (matched by the response in the prompt)."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls = 0

    def chat(self, requests):  # noqa: ANN001, ANN201
        out = []
        for req in requests:
            self.calls += 1
            last = req.messages[-1]["content"]
            key = next((k for k in self.script if k in last), None)
            if key is None:  # a judge request
                out.append([Completion(text="NO", completion_tokens=1)])
                continue
            text = self.script[key].pop(0) if self.script[key] else "garbage"
            out.append([Completion(text=text, completion_tokens=len(text.split()))])
        return out


def _row(rid: str, response: str, verify: str = "agree", domain: str = "speech", **extra: str) -> dict:
    return {"id": rid, "clip_id": rid, "domain": domain, "task": "gender", "response": response,
            "response_tokens": len(response.split()), "surrogate": "[00:00-00:02] hi (duration: 2s)",
            "metadata": {"gender": "female"},
            "verdicts": {"verify": verify, "target_source": "self_generated", **extra}}


def _rephraser(backend: Backend, **over: object) -> Rephraser:
    cfg = RalmConfig()
    for k, v in over.items():
        setattr(cfg.rephrase, k, v)
    return Rephraser(cfg, backend, lambda t: len((t or "").split()))


def test_accepts_first_good_rewrite_and_retries_bad_ones() -> None:
    rows = [
        _row("a", "The metadata says the speaker is female."),
        _row("b", "The description lists a female voice."),
    ]
    backend = Scripted({
        "metadata says": ["<answer>The speaker sounds female.</answer>"],
        "description lists": [
            "Here's an edited version: the voice is female.",  # unparseable
            "<answer>The transcript shows a female voice.</answer>",  # still leaks
            "<answer>The voice sounds male.</answer>",  # lost the verified answer
        ],
    })
    out, rejects = _rephraser(backend)(rows)
    assert [r["id"] for r in out] == ["a"]
    assert out[0]["rephrased"] == "The speaker sounds female." and out[0]["response"] == rows[0]["response"]
    assert out[0]["verdicts"]["rephrase"] == "rephrased"
    assert [(r["id"], r["reason"]) for r in rejects] == [("b", "lost_answer")]
    assert backend.calls == 4  # a: 1 attempt, b: 3 attempts


def test_length_bounds_and_keep_clean_original() -> None:
    long = "<answer>" + "The speaker sounds female. " * 20 + "</answer>"
    rows = [_row("c", "She sounds female."), _row("d", "As given, she is female.")]
    backend = Scripted({"She sounds female.": [long] * 3, "As given": [long] * 3})
    out, rejects = _rephraser(backend, on_failure="keep_clean_original")(rows)
    assert [(r["id"], r["verdicts"]["rephrase"], r["rephrased"]) for r in out] == [
        ("c", "kept_original", "She sounds female.")]  # clean and verified: kept as is
    assert [(r["id"], r["reason"]) for r in rejects] == [("d", "too_long")]  # leaky original: rejected


def test_skips_instruction_and_fallback_rows() -> None:
    rows = [_row("e", "Five.", domain="instruction"),
            _row("f", "The speaker sounds female.", target_source="metadata_fallback")]
    backend = Scripted({})
    out, rejects = _rephraser(backend)(rows)
    assert not rejects and backend.calls == 0
    assert [(r["rephrased"], r["verdicts"]["rephrase"]) for r in out] == [
        ("Five.", "skipped:instruction"), ("The speaker sounds female.", "skipped:metadata_fallback")]


def test_judge_regenerates_then_rejects() -> None:
    class Judge(Scripted):
        def chat(self, requests):  # noqa: ANN001, ANN201
            outs = super().chat(requests)
            return [[Completion(text="YES", completion_tokens=1)] if "Reply with YES or NO" in
                     r.messages[-1]["content"] else o for r, o in zip(requests, outs, strict=True)]

    rows = [_row("g", "The caption says female.")]
    backend = Judge({"caption says": ["<answer>She sounds female.</answer>"] * 5})
    out, rejects = _rephraser(backend, judge=True, judge_max_regenerations=1)(rows)
    assert not out and [r["reason"] for r in rejects] == ["judge_leak"]


def test_infer_task_of_proposed_prompts() -> None:
    from ralm.selfgen.prompts import infer_task

    speech = {"domain": "speech", "metadata": {"gender": "female", "transcript": "hi"}}
    beeps = {"domain": "sound", "metadata": {"label": "beeps", "beep_count": "3"}}
    assert infer_task("Is the speaker a man or a woman?", speech) == "gender"
    assert infer_task("What does the speaker say?", speech) == "transcript"
    assert infer_task("How many beeps do you hear?", beeps) == "beep_count"
    assert infer_task("How many beeps do you hear?", speech) == "open"  # no such fact in this record
    assert infer_task("What is the mood of this clip?", beeps) == "open"
