"""Pure-Python byte-level BPE (GPT-2 / Qwen2), with no dependency on the `tokenizers` library.

The pipeline is the one `tokenizers` runs for Qwen2 (reference: transformers'
`models/qwen2/tokenization_qwen2.py`): added tokens are cut out of the raw text, the rest is NFC
normalised, split by Qwen2's pre-tokenisation regex, each piece's UTF-8 bytes mapped to ids of
the byte alphabet and merged pair by pair in merge-rank order. Speed comes from caching the ids
of every piece seen (text repeats its words) and from working on integer ids with one packed-int
dictionary lookup per candidate pair.
"""

from __future__ import annotations

import heapq

from qwen2.tokenizer.byte_level import BYTE_TO_UNICODE, UNICODE_TO_BYTE
from qwen2.tokenizer.normalize import pretokenize

_SHIFT = 21  # ids stay below 2**21, so a pair packs into one int key: (left << _SHIFT) | right
_CACHE_LIMIT = 200_000  # pieces kept; past this new pieces are merged without being cached
_HEAP_FROM = 48  # pieces at least this long use the O(n log n) merge instead of the O(n^2) scan


class ByteLevelBPE:
    """Byte-level BPE model: `encode_normalized(text)` for NFC text without added tokens, `token_bytes()` to decode."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.vocab = vocab
        size = max(vocab.values(), default=-1) + 1
        if size >= 1 << _SHIFT:
            raise ValueError(f"vocabulary ids reach {size - 1}; at most {(1 << _SHIFT) - 1} are supported")
        self.id_to_token: list[str | None] = [None] * size
        for token, index in vocab.items():
            self.id_to_token[index] = token
        # A byte whose symbol is missing from the vocabulary is dropped, as `tokenizers` does without unk_token.
        self._byte_ids = [vocab.get(BYTE_TO_UNICODE[b]) for b in range(256)]
        self._complete = None not in self._byte_ids
        self._merges: dict[int, tuple[int, int]] = {}  # packed pair -> (rank, merged id)
        for rank, (left, right) in enumerate(merges):
            try:
                key = (vocab[left] << _SHIFT) | vocab[right]
                merged = vocab[left + right]
            except KeyError as exc:
                raise ValueError(
                    f"merge #{rank + 1} {left!r} {right!r} uses a token missing from the vocabulary: {exc}"
                ) from None
            self._merges.setdefault(key, (rank, merged))
        self.merges = merges
        self._split = pretokenize
        self._cache: dict[str, list[int]] = {}
        self._bytes: list[bytes] | None = None

    def encode_normalized(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split(text):
            ids += self.encode_piece(piece)
        return ids

    def encode_piece(self, piece: str) -> list[int]:
        """Ids of one pre-tokenised piece (cached: text repeats its words)."""
        piece_ids = self._cache.get(piece)
        if piece_ids is None:
            piece_ids = self._merge(piece)
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[piece] = piece_ids
        return piece_ids

    def _merge(self, piece: str) -> list[int]:
        byte_ids = self._byte_ids
        word = [byte_ids[b] for b in piece.encode("utf-8")]
        if not self._complete:
            word = [i for i in word if i is not None]
            if not word:
                return word
        if len(word) >= _HEAP_FROM:
            return self._merge_long(word)
        merges = self._merges
        while len(word) > 1:
            best_rank = best_at = -1
            best = None
            for i in range(len(word) - 1):
                found = merges.get((word[i] << _SHIFT) | word[i + 1])
                if found is not None and (best is None or found[0] < best_rank):
                    best_rank, best, best_at = found[0], found, i
            if best is None:
                break
            # Merge every occurrence of the best pair, left to right (an overlapping "aaa" merges once).
            left, right, merged = word[best_at], word[best_at + 1], best[1]
            out: list[int] = word[:best_at]
            i = best_at
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == left and word[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def _merge_long(self, word: list[int]) -> list[int]:
        """Heap-ordered merging over a linked list, for long pieces (runs of spaces, punctuation, ...)."""
        merges = self._merges
        n = len(word)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[int, int, int, int]] = []
        for i in range(n - 1):
            found = merges.get((word[i] << _SHIFT) | word[i + 1])
            if found is not None:
                heap.append((found[0], i, word[i], word[i + 1]))
        heapq.heapify(heap)
        while heap:
            rank, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            # Skip entries made stale by an earlier merge around them.
            if not alive[i] or j >= n or word[i] != left or word[j] != right:
                continue
            word[i] = merges[(left << _SHIFT) | right][1]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            p = prv[i]
            if p >= 0:
                found = merges.get((word[p] << _SHIFT) | word[i])
                if found is not None:
                    heapq.heappush(heap, (found[0], p, word[p], word[i]))
            q = nxt[i]
            if q < n:
                found = merges.get((word[i] << _SHIFT) | word[q])
                if found is not None:
                    heapq.heappush(heap, (found[0], i, word[i], word[q]))
        return [word[i] for i in range(n) if alive[i]]

    def token_bytes(self) -> list[bytes]:
        """The bytes each vocabulary id decodes to, built on first use."""
        if self._bytes is None:
            self._bytes = [token_to_bytes(token) if token is not None else b"" for token in self.id_to_token]
        return self._bytes


def token_to_bytes(token: str) -> bytes:
    """Bytes of a byte-level token; characters outside the byte alphabet stand for their own UTF-8,
    as in the `tokenizers` ByteLevel decoder (added tokens are stored in plain text)."""
    out = bytearray()
    for ch in token:
        b = UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)
