"""Decoding several answers together: one decoder run per token for every sequence in the batch.

A decode step is bound by reading the weights, so stepping B sequences in one run costs little more than stepping
one. Each sequence is prefilled alone, straight into a free row of the batch's KV cache (`Captioner.start(...,
batch=)`), and leaves its row when its answer ends; the others go on undisturbed, and a new sequence can join between
any two steps (the server's continuous batching; `Captioner.generate_batch` for a list).

Rows in use need not be contiguous: a step runs over rows 0 .. highest in use, feeding a free row inside that range
a dummy token (its output is dropped). On the CPU a dummy row costs a row of every product, so a leaving sequence's
row is filled at once by moving the last row into it (a host copy); on a GPU an extra row costs next to nothing and
a move would cross to host memory, so free rows stay where they are until a new sequence takes them.

Tokens equal those of `Captioner.generate` on each sequence exactly with fp32 weights (a row's attention and
products do not depend on the other rows). 4-bit `MatMulNBits` on the CPU computes rows in pairs with one kernel
and a lone row with another (the same values up to float rounding, whose flips near ties change greedy tokens), so
a 4-bit step with batchmates always runs an even number of rows: which batchmates, and how many, then never change
an answer. A sequence stepped alone (by `generate`, or the last one left in a batch) keeps the faster single-row
kernel, so its tokens can differ from the ones it gets beside others; padding it too would cost every lone sequence
16% per token on the 4B int4 (benchmarks/results/batch-4b-int4-rows-2026-12-04.json, part `pad`). A decoder step
graph with int8 `DynamicQuantizeMatMul` quantizes the activations of all rows with one scale, which would make an
answer depend on its batchmates: there the rows are stepped one at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .decoder import KVCache

if TYPE_CHECKING:
    from .captioner import Captioner, Generation

# Sequences decoded together by default (generate_batch, `caption --batch-size`, `serve --max-batch`). On the 2-core
# CPU measured, aggregate 4B int4 decode tokens/s over one sequence: 1.7x at 2, 2.4x at 4, 2.8x at 8 on a quiet
# machine (benchmarks/results/batch-4b-int4-rows-2026-12-04.json). 8 adds about 18% over 4 for twice the KV
# memory, so 4.
DEFAULT_MAX_BATCH = 4


class DecodeBatch:
    """Up to `max_batch` `Generation`s decoded together in the rows of one KV cache; `step` for one token each.

    Sequences enter through `Captioner.start(..., batch=)` (prefilled into a free row, no copy) or `join` (a
    sequence started alone: its positions are copied into a free row), and leave with `leave` or when they finish.
    `compact` (default: on the CPU) moves the last row into a freed one; otherwise free rows wait for the next
    sequence. The batch writes every step's output into its members' states.
    """

    def __init__(self, captioner: Captioner, max_batch: int = DEFAULT_MAX_BATCH, compact: bool | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.captioner = captioner
        self.max_batch = max_batch
        self.compact = captioner.decoder.device == "cpu" if compact is None else compact
        step_plan = (captioner.manifest.data.get("plan") or {}).get("decoder_step", {})
        self.rows_independent = step_plan.get("kind") != "int8"
        self.even_rows = step_plan.get("kind") == "nbits" and captioner.decoder.device == "cpu"
        self.slots: list[Generation | None] = [None] * max_batch  # row -> its generation
        self._reserved: set[int] = set()
        self._cache: KVCache | None = None

    @property
    def members(self) -> list[Generation]:
        """The generations being decoded, in row order."""
        return [generation for generation in self.slots if generation is not None]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def full(self) -> bool:
        return len(self) + len(self._reserved) >= self.max_batch

    def reserve(self, capacity: int) -> tuple[KVCache, int]:
        """A free row with room for `capacity` positions (the cache grows if needed), held for one sequence until it
        joins or is released: where `Captioner.prefill(..., batch=)` writes its prompt."""
        if self.full:
            raise ValueError(f"the batch already decodes {self.max_batch} sequences")
        if self._cache is None:
            rows = self.max_batch + (self.max_batch % 2 if self.even_rows else 0)  # room for a padding row
            self._cache = self.captioner.decoder.new_cache(capacity, rows)
        elif capacity > self._cache.capacity:
            self._cache.grow(capacity)
        row = next(row for row, generation in enumerate(self.slots) if generation is None and row not in self._reserved)
        self._reserved.add(row)
        self._cache.lengths[row] = 0
        return self._cache, row

    def release(self, row: int) -> None:
        """Give back a reserved row whose sequence did not join (its prefill failed)."""
        self._reserved.discard(row)

    def join(self, generation: Generation) -> None:
        """Add a generation: one prefilled into a row reserved here, or one started (or stepped) alone, whose
        positions are copied into a free row. It takes part from the next step."""
        state = generation.state
        if state.batch is not None:
            raise ValueError("this generation already belongs to a batch")
        if state.cache is not self._cache or state.row not in self._reserved:
            cache, row = self.reserve(state.cache.capacity)
            cache.copy_row(state.cache, state.row, row)
            state.cache, state.row = cache, row
        self._reserved.discard(state.row)
        self.slots[state.row] = generation
        state.batch = self

    def leave(self, generation: Generation) -> None:
        """Drop a generation (finished, or given up on); the others keep their rows' contents."""
        row = generation.state.row
        if self.slots[row] is not generation:
            raise ValueError("this generation is not in this batch")
        self.slots[row] = None
        generation.state.batch, generation.state.cache = None, None  # its row goes to the next sequence
        if self.compact:
            last = max((r for r, other in enumerate(self.slots) if other is not None), default=-1)
            if last > row:
                moved = self.slots[last]
                self._cache.copy_row(self._cache, last, row)
                self.slots[row], self.slots[last] = moved, None
                moved.state.row = row

    def step(self) -> list[Generation]:
        """Each member picks its next token; those that finish (or whose `on_text` raised, kept in `error`) leave,
        the rest are fed their tokens in one decoder run. Returns the generations that left."""
        left, chosen = [], []
        for generation in self.members:
            try:
                token = generation.next_token()
            except Exception as exc:  # noqa: BLE001 - a streaming consumer's failure ends that answer only
                generation.error, token = exc, None
            if token is None:
                self.leave(generation)
                left.append(generation)
            else:
                chosen.append((generation, token))
        if chosen:
            self._feed({generation.state.row: token for generation, token in chosen})  # rows as moved by leaving
        return left

    def _feed(self, tokens: dict[int, int]) -> None:
        """One decoder run for the rows in `tokens` (row -> token): rows 0 .. the highest, free rows in that range
        (and a padding row for 4-bit weights) fed a dummy token at their first position."""
        decoder, cache = self.captioner.decoder, self._cache
        rows = max(tokens) + 1
        if self.even_rows and rows % 2 and len(tokens) > 1:  # alone, a sequence keeps the single-row kernel
            rows += 1
        ids = np.array([[tokens.get(row, 0)] for row in range(rows)], dtype=np.int64)  # [rows, 1]
        free = [row for row in range(rows) if row not in tokens]
        for row in free:
            cache.lengths[row] = 0  # a dummy token goes to a free row's first position
        embeds = self.captioner.embed(ids)  # [rows, 1, H]
        if self.rows_independent:
            output = decoder.step_rows(embeds, cache)
            for row in tokens:
                state = self.slots[row].state
                state.output, state.output_row = output, row
        else:
            for row in tokens:
                state = self.slots[row].state
                state.output, state.output_row = decoder.step_rows(embeds[row:row + 1], cache, row), 0
        for row in free:
            cache.lengths[row] = 0
