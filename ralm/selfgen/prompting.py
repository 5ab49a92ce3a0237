"""Message formats of self-generation, self-rephrasing, prompt proposal and the LLM judge.

Plain functions from strings to chat messages and back; no LLM here, so they are unit-tested directly.

- generation (ALARM): system prompt + user turn `<start_audio>{surrogate}<end_audio>\n\n{prompt}`;
  `instruction` clips: the user turn is the spoken question's transcript (the task is the audio itself).
- rephrasing: the response's think tags are renamed (`<think>` -> `<text_llm_reasoning>`) so the rephraser
  does not take the thought as its own; rules + few-shot before/after pairs (our own); the rewrite comes
  back inside `<answer>...</answer>`; the renamed tags are mapped back.
"""

from __future__ import annotations

import re

START_AUDIO, END_AUDIO = "<start_audio>", "<end_audio>"


# ---------------------------------------------------------------------------------------------- generation
def generation_messages(system_prompt: str, surrogate: str, prompt: str) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": f"{START_AUDIO}{surrogate}{END_AUDIO}\n\n{prompt}"})
    return msgs


def instruction_messages(transcript: str, context: str | None = None) -> list[dict]:
    """The LLM answers the spoken question itself (plus any text context), as ALARM does."""
    content = transcript.strip() if not context else f"{context.strip()}\n\n{transcript.strip()}"
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------- think tags
def rename_think_tags(text: str, open_tag: str, close_tag: str, renamed: str) -> str:
    return text.replace(open_tag, f"<{renamed}>").replace(close_tag, f"</{renamed}>")


def restore_think_tags(text: str, open_tag: str, close_tag: str, renamed: str) -> str:
    return text.replace(f"<{renamed}>", open_tag).replace(f"</{renamed}>", close_tag)


_ANSWER_RX = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)


def extract_answer(text: str, require_close: bool = False) -> str | None:
    """The text inside the LAST `<answer>...</answer>` (a model may quote the tag earlier). A missing close
    tag is accepted unless `require_close` (a rewrite cut by the length limit is still a rewrite)."""
    if "<answer>" not in text.lower():
        return None
    matches = list(_ANSWER_RX.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if require_close and "</answer>" not in text[m.start():].lower():
        return None
    body = m.group(1).strip()
    return body or None


# ---------------------------------------------------------------------------------------------- rephrasing
REPHRASE_RULES = """You rewrite answers written by an assistant that was shown a TEXT description of an audio clip.
The rewritten answer must sound like the assistant HEARD the audio. Rules:
1. Change as little as possible: keep the structure, the order, the facts and nearly the same length.
2. Replace reading words with hearing words: "the description says", "the transcript mentions", "as provided",
   "given", "listed", "the caption", "the metadata", "the tags" become "I hear", "it sounds like",
   "the speaker sounds", "you can hear".
3. Never mention a text, transcript, caption, description, metadata, tags, labels, <start_audio> or <end_audio>.
   Do not read out timestamps like [00:00-00:03] or fields like "duration: 3s"; say "about three seconds long".
4. Do not correct or change the answer. Do not finish an answer that stops mid-sentence.
5. Text inside <{renamed}> and </{renamed}> is the assistant's reasoning: rewrite it by the same rules and keep
   the tags exactly where they are.
6. Reply with the rewritten answer only, inside <answer> and </answer>. No comments, no "Here is"."""

# Our own before/after pairs: short, covering a thought, a count, speech and music.
FEW_SHOT: list[tuple[str, str]] = [
    (
        "The description says the sound is a doorbell ringing twice.",
        "I hear a doorbell ringing twice.",
    ),
    (
        "<{renamed}>The transcript mentions a weather report. The gender listed is female.</{renamed}>"
        "The speaker is a woman talking about the weather.",
        "<{renamed}>I hear someone talking about the weather. The voice sounds female.</{renamed}>"
        "The speaker is a woman talking about the weather.",
    ),
    (
        "Based on the provided metadata (duration: 4s, instrument: piano, key: C major), this is a piano "
        "piece in C major.",
        "From what I hear in these four seconds, this is a piano piece in C major.",
    ),
    (
        "According to the caption |three beeps|, there are three beeps at a high pitch.",
        "I can hear three beeps at a high pitch.",
    ),
]


def rephrase_messages(response: str, open_tag: str, close_tag: str, renamed: str) -> list[dict]:
    """Rules as the system turn, few-shot pairs as earlier turns, the response to rewrite last."""
    msgs = [{"role": "system", "content": REPHRASE_RULES.format(renamed=renamed)}]
    for before, after in FEW_SHOT:
        msgs.append({"role": "user", "content": _rephrase_user(before.format(renamed=renamed))})
        msgs.append({"role": "assistant", "content": f"<answer>{after.format(renamed=renamed)}</answer>"})
    renamed_resp = rename_think_tags(response, open_tag, close_tag, renamed)
    msgs.append({"role": "user", "content": _rephrase_user(renamed_resp)})
    return msgs


def _rephrase_user(text: str) -> str:
    return f"Rewrite this answer:\n{text}"


def parse_rephrase(output: str, open_tag: str, close_tag: str, renamed: str) -> str | None:
    """The rewrite with tags mapped back, or None when the output has no `<answer>` block."""
    body = extract_answer(output)
    if body is None:
        return None
    return restore_think_tags(body, open_tag, close_tag, renamed)


# ---------------------------------------------------------------------------------------------- judge
JUDGE_PROMPT = (
    "Here is an answer about an audio clip:\n\n{text}\n\n"
    "Does this answer reveal that its author read a text description, transcript, caption or metadata "
    "instead of listening to the audio? Reply with YES or NO only."
)


def judge_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(text=text)}]


def parse_yes_no(output: str) -> bool | None:
    m = re.search(r"\b(yes|no)\b", output, re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


# ---------------------------------------------------------------------------------------------- prompt proposal
PROPOSE_SYSTEM = (
    "You write questions that a listener could answer by HEARING an audio clip. You are shown a text "
    "description of the clip between <start_audio> and <end_audio>. Write {k} different short questions "
    "about what can be heard (who speaks, what is said, what sound, instrument, pitch, tempo, how many). "
    "Never mention text, descriptions, captions, metadata or timestamps. One question per line, nothing else."
)
PROPOSE_EXAMPLE = (
    "[00:00-00:02] |bell| (duration: 2s, label: bell, pitch register: high)",
    "What sound do you hear?\nIs the pitch of the sound high or low?\nHow long does the sound ring?",
)


def propose_messages(surrogate: str, k: int) -> list[dict]:
    ex_in, ex_out = PROPOSE_EXAMPLE
    return [
        {"role": "system", "content": PROPOSE_SYSTEM.format(k=k)},
        {"role": "user", "content": f"{START_AUDIO}{ex_in}{END_AUDIO}"},
        {"role": "assistant", "content": ex_out},
        {"role": "user", "content": f"{START_AUDIO}{surrogate}{END_AUDIO}"},
    ]


_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|q\d*[:.)])\s*", re.IGNORECASE)


def parse_proposals(output: str, max_words: int = 30) -> list[str]:
    """Candidate prompts: one per line, list markers stripped, questions/imperatives of 3..max_words words."""
    out: list[str] = []
    for line in output.splitlines():
        q = _LIST_MARK.sub("", line).strip().strip('"').strip()
        n = len(q.split())
        if not (3 <= n <= max_words) or not re.search(r"[a-z]", q, re.IGNORECASE):
            continue
        if not (q.endswith("?") or q.endswith(".")):
            continue
        if q.lower() not in {o.lower() for o in out}:
            out.append(q)
    return out


CHECK_PROMPT = (
    "Audio clip (as text): {surrogate}\n\nQuestion: {prompt}\n\n"
    "Can a listener answer this question just by hearing the audio clip, without reading any text about it? "
    "Reply with YES or NO only."
)


def check_messages(surrogate: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": CHECK_PROMPT.format(surrogate=surrogate, prompt=prompt)}]
