"""`ralm prompts`: task prompts per clip -> `run_dir/prompts/data`, one row per (clip, prompt).

Rows: `id = f"{clip_id}/p{k}"`, `clip_id`, `prompt`, `task` (the metadata key the prompt asks about, or
`open`/`describe`/`instruction`), `verdicts.prompt_source` (`template` | `llm`).

- `prompts.source: template` (default): the foundation's template pool (`ralm.corpus.prompts`).
- `prompts.source: llm`: the frozen LLM proposes `candidates` prompts from each surrogate; lexical filters
  (no leak words, a question or an instruction of 3..30 words, no duplicates) and, with `check`, the LLM
  checker (YES/NO "answerable by hearing?") filter them; each survivor's task is inferred from its words
  (a gender question -> `gender`, ...; else `open`). Too few survivors -> templates fill up, so every clip
  gets `per_clip` prompts. Instruction clips always use the instruction prompt (the task is spoken).
- Only clips of `prompts.splits` (train, valid) get prompts: test clips are held out and never get
  targets, so they cannot reach training.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ralm import records, storage
from ralm.corpus.prompts import available_tasks, template_prompts
from ralm.llm.engines import ChatRequest, Sampling
from ralm.selfgen import audit, prompting
from ralm.selfgen.leak import has_leak
from ralm.selfgen.stage import carry, count_pending, pending, row_seed, run_batches

log = logging.getLogger(__name__)
STAGE = "prompts"

# Words that reveal which fact a proposed prompt asks about (first match wins, in this order).
TASK_CUES: list[tuple[str, str]] = [
    ("gender", r"\b(male|female|gender|man or a woman|man or woman)\b"),
    ("beep_count", r"\bhow many\b|\bcount\b|\bnumber of\b"),
    ("noise_colour", r"\b(colou?r of (the )?noise|white|pink|brown)\b"),
    ("instrument", r"\binstrument"),
    ("key", r"\bwhat key\b|\bwhich key\b|\bkey is\b|\bin what key\b"),
    ("mode", r"\bmajor or (a )?minor\b"),
    ("tempo", r"\btempo\b|\bhow fast\b|\bspeed of the music\b"),
    ("pitch_register", r"\bpitch\b"),
    ("sweep_direction", r"\b(rise|rising|fall|falling)\b"),
    ("speaking_rate", r"\b(speaking rate|how fast .* speak|pace)\b"),
    ("transcript", r"\bwhat (does|did) the .* say\b|\bwhat is (being )?said\b|\btranscribe\b|\bwords\b"),
    ("label", r"\bwhat (sound|kind of sound|is making|produces)\b|\bidentify the sound\b|\bsound source\b"),
]


def infer_task(prompt: str, record: dict[str, Any]) -> str:
    """The record's fact a prompt asks about (only keys the record holds), else `open`."""
    tasks = set(available_tasks(record))
    for task, rx in TASK_CUES:
        if task in tasks and re.search(rx, prompt, re.IGNORECASE):
            return task
    return "open"


def _rows_for(clip: dict, pairs: list[tuple[str, str, str]]) -> list[dict]:
    return [
        carry(clip, id=f"{clip['clip_id'] or clip['id']}/p{k}", clip_id=clip["clip_id"] or clip["id"],
              prompt=prompt, task=task, verdicts={"prompt_source": src})
        for k, (task, prompt, src) in enumerate(pairs)
    ]


class PromptProposer:
    """LLM proposals + checker for a batch of clips; templates fill what the LLM can't."""

    def __init__(self, cfg: Any, backend: Any) -> None:
        self.cfg, self.backend = cfg, backend
        self.pc = cfg.prompts

    def _sampling(self, clip_id: str, attempt: int) -> Sampling:
        s = self.pc.sampling
        return Sampling(s.temperature, s.top_p, s.max_new_tokens, row_seed(s.seed, clip_id, attempt))

    def __call__(self, clips: list[dict]) -> tuple[list[dict], list[dict]]:
        k, seed = self.pc.per_clip, self.pc.seed
        llm_clips = [c for c in clips if c.get("domain") != "instruction" and c.get("surrogate")]
        proposals: dict[str, list[str]] = {}
        errors: dict[str, str] = {}
        if self.pc.source == "llm" and llm_clips:
            reqs = [ChatRequest(prompting.propose_messages(c["surrogate"], self.pc.candidates),
                                self._sampling(c["id"], 0)) for c in llm_clips]
            for c, comps in zip(llm_clips, self.backend.chat(reqs), strict=True):
                comp = comps[0]
                if not comp.ok:
                    errors[c["id"]] = comp.reason or "engine_error"
                    continue
                cands = [q for q in prompting.parse_proposals(comp.text) if not has_leak(q)]
                proposals[c["id"]] = cands[: self.pc.candidates]
            if self.pc.check:
                self._check(llm_clips, proposals)
        out: list[dict] = []
        for c in clips:
            picked: list[tuple[str, str, str]] = []
            for q in proposals.get(c["id"], []):
                if len(picked) < k:
                    picked.append((infer_task(q, c), q, "llm"))
            if len(picked) < k:
                used = {p for _, p, _ in picked}
                for task, prompt in template_prompts(c, k, seed, self.pc.task_weights):
                    if len(picked) < k and prompt not in used:
                        picked.append((task, prompt, "template"))
            rows = _rows_for(c, picked)
            if c["id"] in errors:
                for r in rows:
                    r["verdicts"]["llm_error"] = errors[c["id"]]
            out.extend(rows)
        return out, []

    def _check(self, clips: list[dict], proposals: dict[str, list[str]]) -> None:
        pairs = [(c, q) for c in clips for q in proposals.get(c["id"], [])]
        if not pairs:
            return
        reqs = [ChatRequest(prompting.check_messages(c["surrogate"], q),
                            Sampling(0.0, 1.0, 4, 0)) for c, q in pairs]
        keep: dict[str, list[str]] = {}
        for (c, q), comps in zip(pairs, self.backend.chat(reqs), strict=True):
            if comps[0].ok and prompting.parse_yes_no(comps[0].text) is True:
                keep.setdefault(c["id"], []).append(q)
        for cid in proposals:
            proposals[cid] = keep.get(cid, [])


def _clip_key(row: dict) -> str:
    return row.get("clip_id") or row["id"]


def run(cfg: Any, run_dir: str) -> str:
    """Write `run_dir/prompts`; returns its URI. Resumable: clips already committed are skipped."""
    storage.configure(cfg.storage)
    stage_uri = cfg.stage_uri(STAGE, run_dir)
    if records.is_complete(stage_uri):
        return stage_uri
    corpus = records.data_uri(cfg.stage_uri("corpus", run_dir))
    if not records.part_uris(corpus):
        raise FileNotFoundError(f"no corpus dataset at {corpus}: run `ralm corpus build` first")
    done_rows = records.done_ids(stage_uri)
    done = {i.split("/", 1)[0] for i in done_rows}  # a clip is done when any of its rows is committed
    todo = count_pending(corpus, done, cfg.prompts.splits, _clip_key)
    backend = None
    if cfg.prompts.source == "llm" and todo:
        from ralm.selfgen.backend import open_backend

        backend = open_backend(cfg)
    try:
        proposer = PromptProposer(cfg, backend)
        rows = pending(corpus, done, cfg.prompts.splits, _clip_key)
        counts = run_batches(stage_uri, rows, proposer, cfg.prompts.part_rows, todo, "prompts",
                             parts_in_flight=cfg.llm.serve.parts_in_flight)
    finally:
        if backend is not None:
            backend.close()
    audit.write_report(stage_uri, audit.prompts_report(stage_uri, cfg, counts))
    records.mark_success(stage_uri, {"rows": len(records.read_ids(records.data_uri(stage_uri)))})
    return stage_uri
