"""Keys and values of prompt prefixes, kept after their requests leave, so that a writer who
resends the same document plus five words prefills only the five words.

Design (copies into the slot layout): prompts are cut into blocks of BLOCK_TOKENS tokens. A
block is stored once, under (its parent block's node, its tokens), so a block is found only
when every block before it matched too: an exact trie over token blocks, no hash that could
collide. A new request whose prompt starts with cached blocks gets their keys and values
copied into its cache slot and prefills from the first block that was not there.

Why copies rather than running requests reading shared blocks (vLLM's paged attention): the
engine's decode attention reads each slot as one contiguous run of positions, which is what
makes it cheap on a CPU. A copy of 600 tokens of gpt2-small's cache moves 44 MB (a few ms);
prefilling them takes about a second here. It also means a running request never depends on a
cached block, so eviction can never hurt one.

Eviction is least-recently-used over blocks. A lookup touches a chain from its last block back
to its first, so a parent block is always more recent than its children and the LRU end holds
leaves: a block is evicted only after everything that extends it.

The cache belongs to one Engine, which holds one model (base plus merged adapter): a reloaded
checkpoint or another adapter is another Engine with a cache of its own, so entries are never
shared between models.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16


@dataclass
class _Block:
    node: int  # unique for the life of the cache, so a child key never outlives its parent
    index: int  # row in the block tensors
    parent: int  # node of the block before it (-1 for a prompt's first block)
    key: tuple[int, tuple[int, ...]]


class PrefixCache:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, capacity_tokens: int,
                 block_tokens: int = BLOCK_TOKENS):
        """`k_cache`/`v_cache` are the runner's [layer, slot, position, head, head_dim] caches."""
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        layers, _, _, heads, dim = k_cache.shape
        shape = (layers, self.capacity_blocks, block_tokens, heads, dim)
        # Zeroed at start, like the runner's cache: the budget is resident from the first second
        # rather than creeping up as blocks are first written (which looked like a leak).
        self.k = torch.zeros(shape, device=k_cache.device, dtype=k_cache.dtype)
        self.v = torch.zeros(shape, device=v_cache.device, dtype=v_cache.dtype)
        self._k_cache, self._v_cache = k_cache, v_cache
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._free = list(range(self.capacity_blocks - 1, -1, -1))
        self._nodes = itertools.count()
        self.hit_tokens = 0  # prompt tokens served from the cache, over the cache's life

    @property
    def cached_tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def _chain(self, prompt_ids: list[int], limit: int) -> list[_Block]:
        """The cached blocks that start `prompt_ids`, at most `limit` of them."""
        chain, parent = [], -1
        for i in range(limit):
            tokens = tuple(prompt_ids[i * self.block_tokens : (i + 1) * self.block_tokens])
            block = self._blocks.get((parent, tokens))
            if block is None:
                break
            chain.append(block)
            parent = block.node
        for block in reversed(chain):  # last block first: parents end up more recent
            self._blocks.move_to_end(block.key)
        return chain

    def load(self, prompt_ids: list[int], slot: int) -> int:
        """Copy the longest cached prefix of the prompt into `slot`; return its length in tokens.

        The prompt's last token is never served from the cache: its logits pick the first new
        token, so it must run through the model.
        """
        chain = self._chain(prompt_ids, (len(prompt_ids) - 1) // self.block_tokens)
        if not chain:
            return 0
        n = len(chain) * self.block_tokens
        rows = torch.tensor([b.index for b in chain], device=self.k.device)
        for cache, blocks in ((self._k_cache, self.k), (self._v_cache, self.v)):
            layers, _, _, heads, dim = blocks.shape
            # [layer, block, t, head, dim] -> [layer, block * t, head, dim], positions 0..n-1
            cache[:, slot, :n] = blocks[:, rows].reshape(layers, n, heads, dim)
        self.hit_tokens += n
        return n

    def store(self, prompt_ids: list[int], slot: int) -> None:
        """Keep the full blocks of a prompt that has just been prefilled into `slot`."""
        if not self.capacity_blocks:
            return
        full = min(len(prompt_ids) // self.block_tokens, self.capacity_blocks)
        chain = self._chain(prompt_ids, full)
        parent = chain[-1].node if chain else -1
        for i in range(len(chain), full):
            index = self._allocate(keep=parent)
            if index is None:
                return
            start, end = i * self.block_tokens, (i + 1) * self.block_tokens
            self.k[:, index] = self._k_cache[:, slot, start:end]
            self.v[:, index] = self._v_cache[:, slot, start:end]
            block = _Block(next(self._nodes), index, parent, (parent, tuple(prompt_ids[start:end])))
            self._blocks[block.key] = block
            parent = block.node
        self._chain(prompt_ids, full)  # re-touch, last block first: parents stay more recent

    def _allocate(self, keep: int) -> int | None:
        """A free block row, evicting the least recently used block if needed (never `keep`,
        the parent the new block is about to hang from)."""
        if self._free:
            return self._free.pop()
        for key, block in self._blocks.items():
            if block.node != keep:
                del self._blocks[key]
                return block.index
        return None
