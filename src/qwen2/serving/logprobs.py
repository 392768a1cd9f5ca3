"""Token log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`
and the legacy completions' parallel lists `{tokens, token_logprobs, top_logprobs, text_offset}` (which
evaluation harnesses read, with `echo`, to score prompts)."""

from __future__ import annotations

from typing import Any

from qwen2.serving.outputs import Logprob
from qwen2.tokenizer.byte_level import UNICODE_TO_BYTE


class TokenText:
    """Each token's text and raw bytes (a byte-level token may be part of a UTF-8 character), memoised."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if all(ch in UNICODE_TO_BYTE for ch in piece):
                raw = bytes(UNICODE_TO_BYTE[ch] for ch in piece)
            else:  # an added token: its text is its content
                raw = piece.encode("utf-8")
            entry = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = entry
        return entry


def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    """The k most likely tokens of one position, most likely first."""
    ranked = sorted(entry.values(), key=lambda lp: (lp.rank if lp.rank is not None else 1 << 30, -lp.logprob))
    return ranked[:k]


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int,
                  token_text: TokenText) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries):
        text, raw = token_text(token_id)
        top = [{"token": token_text(lp.token_id)[0], "logprob": lp.logprob, "bytes": token_text(lp.token_id)[1]}
               for lp in _top(entry, top_k)]
        content.append({"token": text, "logprob": entry[token_id].logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob] | None], top_k: int,
                        token_text: TokenText, text_offset: int = 0) -> dict[str, Any]:
    """`entries[i]` None is a position with no logprob (the first prompt token under echo)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = token_text(token_id)[0]
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry[token_id].logprob)
        top = {token_text(lp.token_id)[0]: lp.logprob for lp in _top(entry, top_k)}
        top.setdefault(text, entry[token_id].logprob)  # OpenAI lists the chosen token among its top
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
