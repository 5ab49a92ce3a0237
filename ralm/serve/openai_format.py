"""OpenAI chat-completion response formats, shared by both endpoints (the frozen LLM's and the trained
ALM's): the `chat.completion` body, the error object, and for `stream: true` the server-sent events
(`chat.completion.chunk` objects, then `data: [DONE]`), so stock clients parse them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

DONE = "data: [DONE]\n\n"


def stop_strings(stop: Any) -> tuple[str, ...]:
    """A request's `stop`: a string or up to 4 strings (ValueError otherwise); empty ones dropped."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
    if stops is None or len(stops) > 4 or not all(isinstance(x, str) for x in stops):
        raise ValueError("stop must be a string or a list of up to 4 strings")
    return tuple(dict.fromkeys(x for x in stops if x))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_object(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
                 ) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def completion(model: str, answers: Sequence[tuple[str, str]], prompt_tokens: int, completion_tokens: int
               ) -> dict[str, Any]:
    """A `chat.completion` body: one choice per (text, finish_reason)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": None} for i, (text, finish) in enumerate(answers)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class ChunkStream:
    """The events of one streamed completion: one id and creation time for all its chunks."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                      "model": self.model, "choices": choices, **extra})

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> str:
        return self._chunk([{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The closing usage chunk (`stream_options: {"include_usage": true}`): no choices."""
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(message: str, code: str, kind: str = "server_error", param: str | None = None) -> str:
        """A failure after the stream has started (its HTTP status is already sent)."""
        return event(error_object(message, code, kind, param))

    def whole(self, answers: Sequence[tuple[str, str]], include_usage: bool = False, prompt_tokens: int = 0,
              completion_tokens: int = 0) -> Iterator[str]:
        """Finished answers ((text, finish_reason) per choice) as a stream: each answer in one chunk."""
        for i, (text, finish) in enumerate(answers):
            yield self.delta({"role": "assistant", "content": ""}, index=i)
            if text:
                yield self.delta({"content": text}, index=i)
            yield self.delta({}, finish, index=i)
        if include_usage:
            yield self.usage(prompt_tokens, completion_tokens)
        yield DONE
