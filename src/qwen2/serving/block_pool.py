"""The paged KV cache's bookkeeping: which blocks are free, who holds each one, and the prefix cache.

Blocks are indices into the runner's KV tensors. A block is held by every sequence whose block table lists
it (`ref_counts`). A free block keeps its keys/values and its prefix key until it is handed out again, so a
later request with the same prefix can take it back: free blocks sit in least-recently-freed order and the
oldest is evicted first (LRU). With prefix caching off no key is ever recorded.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"The KV cache needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._keys: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which served from it

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (cached ones included: they are evicted on demand)."""
        return len(self._free)

    def cached_prefix(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of `keys` (not yet taken: see `take`)."""
        blocks: list[int] = []
        if not self.enable_prefix_caching:
            return blocks
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_needed(self, cached: list[int], new: int) -> int:
        """Free blocks taken by holding `cached` (those nobody holds now) plus `new` fresh ones."""
        return new + sum(1 for block in cached if self.ref_counts[block] == 0)

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks (a prefix hit)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks, evicting the least recently freed cached ones."""
        if count > len(self._free):
            raise RuntimeError(f"Asked for {count} KV blocks with {len(self._free)} free (scheduler bug).")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            key = self._keys[block]
            if key is not None:
                if self._cached.get(key) == block:
                    del self._cached[key]
                self._keys[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each block; a block nobody holds becomes free. The table's tail is freed first,
        so a sequence's last blocks are evicted before the shared prefix its first blocks hold."""
        for block in reversed(blocks):
            count = self.ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"KV block {block} released more often than held (engine bug).")
            self.ref_counts[block] = count
            if count == 0:
                self._free[block] = None

    def register(self, block: int, key: bytes) -> None:
        """Offer a full, computed block to the prefix cache under its prefix key (the first block with a key
        keeps it: an identical later block stays private and is simply freed)."""
        if self.enable_prefix_caching and key not in self._cached:
            self._cached[key] = block
            self._keys[block] = key
