"""OpenAI chat-completion response formats, shared by both endpoints (the frozen LLM's and the trained
ALM's): the `chat.completion` body, the error object, and for `stream: true` the server-sent events
(`chat.completion.chunk` objects, then `data: [DONE]`), so stock clients parse them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi.responses import JSONResponse

DONE = "data: [DONE]\n\n"


def stop_strings(stop: Any) -> tuple[str, ...]:
    """A request's `stop`: a string or up to 4 strings (ValueError otherwise); empty ones dropped."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
    if stops is None or len(stops) > 4 or not all(isinstance(x, str) for x in stops):
        raise ValueError("stop must be a string or a list of up to 4 strings")
    return tuple(dict.fromkeys(x for x in stops if x))


# Request options that change what an answer is (token log-probabilities, tool calls, JSON mode, sampling
# penalties and filters, audio output, constrained decoding). Neither endpoint implements them, and a client
# that set one must not get an answer that silently ignored it: a 400 naming them instead. Their default
# values pass.
_NOT_IMPLEMENTED: dict[str, Any] = {
    "logprobs": lambda v: not v,
    "top_logprobs": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: not v or (isinstance(v, dict) and v.get("type") == "text"),
    "presence_penalty": lambda v: not v,
    "frequency_penalty": lambda v: not v,
    "logit_bias": lambda v: not v,
    "modalities": lambda v: not v or list(v) == ["text"],
    "audio": lambda v: not v,
    # vLLM's extensions to the request, which clients written for a vLLM server send
    "top_k": lambda v: v in (None, 0, -1),
    "min_p": lambda v: not v,
    "repetition_penalty": lambda v: v in (None, 1, 1.0),
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "min_tokens": lambda v: not v,
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": lambda v: not v,
    "ignore_eos": lambda v: not v,
    "stop_token_ids": lambda v: not v,
    "bad_words": lambda v: not v,
    "prompt_logprobs": lambda v: v is None,
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
}


def unsupported_options(body: dict[str, Any]) -> list[str]:
    """The options in a chat request that ask for something this server does not do (empty: none)."""
    return [k for k, default in _NOT_IMPLEMENTED.items() if k in body and not default(body[k])]


def unsupported_message(names: Sequence[str]) -> str:
    return (f"not supported by this server: {', '.join(names)} (answers are plain text; supported: messages, "
            "max_tokens/max_completion_tokens, temperature, top_p, seed, stop, n, stream, stream_options)")


def model_card(model: str, **extra: Any) -> dict[str, Any]:
    """A `/v1/models` entry."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "ralm", **extra}


def retrieve_model(model: str, served: str, **extra: Any) -> Any:
    """`GET /v1/models/{model}`: the served model's card, or a 404 naming the model that is served."""
    if model == served:
        return model_card(served, **extra)
    return JSONResponse(status_code=404, content=error_object(
        f"the model {model!r} does not exist; this server serves {served!r}", "model_not_found", param="model"))


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
