"""MCQ prompt, answer parsing and the official scoring rules (MMAU string_match, MMSU letters)."""

from __future__ import annotations

import pytest

from ralm.eval.scoring import build_prompt, parse_choice, score_item, string_match, summarize

CHOICES = ["Violin", "Electric violin", "Piano", "Flute"]


def test_prompt_numbers_choices_and_asks_for_answer_tag():
    p = build_prompt("Which instrument?", CHOICES)
    assert "1. Violin\n2. Electric violin\n3. Piano\n4. Flute" in p
    assert "<answer>1</answer>" in p
    assert p.startswith("Which instrument?")


@pytest.mark.parametrize(
    "output, expected",
    [
        ("<answer>2</answer>", 1),
        ("I hear strings. <answer> 3 </answer>", 2),
        ("<answer>(4)</answer>", 3),
        ("<answer>2. Electric violin</answer>", 1),
        ("<answer>B</answer>", 1),  # a letter
        ("<answer>Piano</answer>", 2),  # the choice's text
        ("<answer>1</answer> then <answer>3</answer>", 2),  # the last tag wins
        ("<think>maybe <answer>1</answer>?</think>The answer: <answer>4</answer>", 3),
        ("It sounds like <answer>3", 2),  # cut off by the token limit
        ("3", 2),  # a bare number
        ("flute", 3),  # a bare choice text
        ("It is clearly an electric violin.", 1),  # text naming exactly one choice
    ],
)
def test_parse_choice(output, expected):
    assert parse_choice(output, CHOICES) == expected


@pytest.mark.parametrize(
    "output",
    [
        "",
        None,
        "I cannot tell.",
        "<answer>7</answer>",  # out of range
        "<answer>0</answer>",
        "<answer></answer>",
        "<answer>violin or piano</answer>",  # names two choices
        "<think>it might be 2 but the thought never closes",
        "<answer>A dog</answer>",  # not a letter enumerator; no choice named
    ],
)
def test_unparsable_output_is_none_never_a_guess(output):
    assert parse_choice(output, CHOICES) is None


def test_template_opened_thought():
    # Reasoning templates open <think> in the prompt: the reply carries only the close tag.
    assert parse_choice("the violin, I think</think><answer>1</answer>", CHOICES, thought_open=True) == 0
    # Cut off inside the thought: mentioning a choice while thinking is not an answer.
    assert parse_choice("Maybe it is the piano", CHOICES, thought_open=True) is None
    assert parse_choice("Maybe it is the piano", CHOICES) == 2


def test_number_words_inside_choices_are_text_not_indices():
    choices = ["1 beep", "4 beeps", "2 beeps", "3 beeps"]
    assert parse_choice("<answer>2 beeps</answer>", choices) == 2  # the text "2 beeps" is choice 3
    assert parse_choice("<answer>2</answer>", choices) == 1  # an option number
    numeric = ["18", "16", "2", "17"]
    assert parse_choice("<answer>2</answer>", numeric) == 1  # in range: the option number wins
    assert parse_choice("<answer>17</answer>", numeric) == 3  # out of range: the numeric choice's value
    assert parse_choice("<answer>99</answer>", numeric) is None


def test_string_match_one_choice_inside_another():
    # "Violin" is inside "Electric violin": picking the longer one must not count for the shorter answer.
    assert string_match("Violin", "Violin", CHOICES)
    assert not string_match("Violin", "Electric violin", CHOICES)
    assert string_match("Electric violin", "electric violin!", CHOICES)
    assert not string_match("Electric violin", "violin", CHOICES)


def test_string_match_multi_word_and_empty():
    choices = ["a man speaking", "a woman speaking", "a dog barking"]
    assert string_match("a woman speaking", "A woman speaking.", choices)
    assert not string_match("a woman speaking", "a man speaking", choices)
    assert not string_match("a woman speaking", "", choices)
    # Mentioning a wrong choice's distinguishing word fails, as in the official scorer.
    assert not string_match("a woman speaking", "a woman speaking, not a man", choices)


def test_scorers_and_summary():
    assert score_item("string_match", CHOICES, 0, 0)
    assert not score_item("string_match", CHOICES, 0, 1)
    assert not score_item("string_match", CHOICES, 0, None)
    assert score_item("letter", ["x", "y", "z", "w"], 2, 2)
    assert not score_item("letter", ["x", "y", "z", "w"], 2, None)
    with pytest.raises(KeyError, match="unknown scorer"):
        score_item("nope", CHOICES, 0, 0)
    rows = [
        {"correct": True, "pred_index": 0, "choices": CHOICES, "domain": "music", "difficulty": "easy"},
        {"correct": False, "pred_index": None, "choices": ["a", "b"], "domain": "speech", "difficulty": "easy"},
        {"correct": False, "pred_index": 1, "choices": ["a", "b"], "domain": "speech", "difficulty": "hard"},
    ]
    s = summarize(rows, ("domain", "difficulty"))
    assert s["total"] == 3 and s["correct"] == 1
    assert s["unparsed"] == 1 and s["unparsed_rate"] == pytest.approx(1 / 3)
    assert s["chance"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert s["by_domain"]["speech"]["accuracy"] == 0.0
    assert s["by_domain"]["music"]["accuracy"] == 1.0
    assert s["by_difficulty"]["easy"]["total"] == 2


def test_stage_scoring_matches_the_official_rule_on_the_submission_file():
    """`run.score` on fixed replies: our accuracy == the official string_match over the written file."""
    from pathlib import Path

    from ralm.eval.benchmarks import get_benchmark
    from ralm.eval.controls import apply_control
    from ralm.eval.run import p_above_chance, render_markdown, score_items, summarize_scored, vs_controls

    bench = get_benchmark("mmau")
    items = bench.load(str(Path(__file__).parent.parent / "fixtures" / "eval" / "mmau-mini.json")).items
    conds = {"audio": items, "shuffled": apply_control("shuffled", items, 0)}
    replies = {"mmau-1": "<answer>1</answer>",  # Violin: right
               "mmau-2": "<think>hmm</think><answer>sad</answer>",  # right, by text
               "mmau-3": "I am not sure."}  # unparsed
    preds = {f"audio/{k}": {"response": v} for k, v in replies.items()}
    preds["shuffled/mmau-1"] = {"response": "<answer>2</answer>"}  # Electric violin: wrong
    errors = {"shuffled/mmau-3": {"reason": "missing"}}
    summaries, subs = summarize_scored(bench, score_items(bench, conds, preds, errors))
    audio = summaries["audio"]
    assert (audio["correct"], audio["total"], audio["unparsed"]) == (2, 3, 1)
    official = sum(string_match(r["answer"], r["model_output"], r["choices"]) for r in subs["audio"])
    assert official == audio["correct"]
    assert [r["model_output"] for r in subs["audio"]] == ["Violin", "sad", ""]
    assert subs["audio"][2]["raw_output"] == "I am not sure."
    assert summaries["shuffled"]["correct"] == 0
    assert summaries["shuffled"]["errors"] == {"missing": 1, "missing_prediction": 1}
    assert audio["by_domain"]["music"]["accuracy"] == 1.0 and audio["by_difficulty"]["hard"]["unparsed"] == 1
    # Audio 2/3 vs shuffled 0/3 on the same items: both discordant items favour the audio.
    conds["shuffled"] = conds["shuffled"][::-1]  # paired by item id, not by position
    vs = vs_controls(score_items(bench, conds, preds, errors))["shuffled"]
    assert vs["delta"] == pytest.approx(2 / 3)
    assert vs["ci95"][0] < 0 < 2 / 3 < vs["ci95"][1]  # three items cannot rule out "no gap"
    assert (vs["audio_right_control_wrong"], vs["audio_wrong_control_right"], vs["n"]) == (2, 0, 3)
    assert vs["mcnemar_p"] == pytest.approx(0.5)  # 2 * (1/2)^2
    p_chance = p_above_chance(items, audio["correct"])
    assert p_chance == pytest.approx(9 / 48)  # >= 2 right of 4, 4 and 3 choices: 1/48 + 8/48
    md = render_markdown({"benchmark": "mmau", "items": 3, "rejected_items": 1, "data": "x.json", "adapters": ["a"],
                          "conditions": summaries, "chance": 0.3, "overall": audio["accuracy"],
                          "group_keys": list(bench.group_keys), "skipped_controls": {"silence": "why"},
                          "predictions": "p.json", "vs_controls": {"shuffled": vs}, "p_above_chance": p_chance})
    # Wilson 95%: 2/3 -> 20.8-93.9%, 0/3 -> 0-56.2% (z^2 / (3 + z^2) = 0.5615).
    assert "| condition | accuracy | 95% CI | correct / total |" in md
    assert "| audio | 66.7% | 20.8–93.9% | 2 / 3 | 33.3% | 0 |" in md and "| shuffled | 0.0% | 0.0–56.2% | 0 / 3 |" in md
    assert "## Is the audio heard?" in md
    assert f"- audio vs shuffled: +66.7 points (95% CI {100 * vs['ci95'][0]:+.1f} to " in md
    assert "McNemar p = 0.50, 2 vs 0 discordant items) — not significant at p < 0.05" in md
    assert "- audio vs chance: 66.7% vs 30.0% (exact one-sided p = 0.19) — not significant" in md
    assert "## By domain" in md and "Skipped controls: silence: why" in md
