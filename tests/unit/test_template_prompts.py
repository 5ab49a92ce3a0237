"""Template task prompts: which tasks a record gets, and how `prompts.task_weights` steers them."""

from __future__ import annotations

from collections import Counter

from ralm.corpus.prompts import TEMPLATES, available_tasks, template_prompts


def _speech(i: int) -> dict:
    return {"id": f"s{i}", "clip_id": f"s{i}", "domain": "speech",
            "metadata": {"gender": "female", "transcript": "hello there", "speaking_rate": "fast"}}


def test_unweighted_prompts_are_distinct_fitting_and_deterministic():
    rec = _speech(0)
    pairs = template_prompts(rec, k=3, seed=1)
    assert pairs == template_prompts(rec, k=3, seed=1)
    assert len({t for t, _ in pairs}) == 3
    assert all(t in available_tasks(rec) and p in TEMPLATES[t] for t, p in pairs)
    assert template_prompts({"id": "i", "clip_id": "i", "domain": "instruction"}, k=2)[0][0] == "instruction"


def test_task_weights_exclude_zero_weight_tasks_and_favour_heavy_ones():
    weights = {"gender": 20.0, "speaking_rate": 0, "describe": 0}
    firsts = Counter()
    for i in range(200):
        pairs = template_prompts(_speech(i), k=3, seed=0, weights=weights)
        tasks = [t for t, _ in pairs]
        assert "speaking_rate" not in tasks and "describe" not in tasks
        assert sorted(tasks) == ["gender", "transcript"]  # what is left, each once
        firsts[tasks[0]] += 1
    # P(gender first) = 20 / 21 for weights 20 vs 1; unweighted it would be ~1/2
    assert firsts["gender"] > 170
    unweighted = Counter(template_prompts(_speech(i), k=1, seed=0)[0][0] for i in range(200))
    assert unweighted["gender"] < 120
