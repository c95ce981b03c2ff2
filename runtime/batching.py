"""Decoding several answers together: one decoder run per token for every sequence in the batch.

A decode step is bound by reading the weights, so stepping B sequences in one run costs little more than stepping
one. Each sequence is prefilled alone (`Captioner.start`), joins a `DecodeBatch`, which copies its KV positions into
a row of a shared cache, and leaves it when its answer ends; the others go on undisturbed, and a new sequence can
join between any two steps (the server's continuous batching; `Captioner.generate_batch` for a list).

Tokens equal those of `Captioner.generate` on each sequence exactly with fp32 weights (a row's attention and
products do not depend on the other rows). With 4-bit `MatMulNBits` weights, a batched product uses the GEMM
kernel where one sequence uses the GEMV kernel: the same values up to float rounding, rows still independent of
each other, but the rounding flips near ties (on the random-weight 4B int4 every batched answer left its
single-sequence tokens within 10 tokens). A decoder step graph with int8 `DynamicQuantizeMatMul` quantizes the
activations of all rows with one scale, which would make an answer depend on its batchmates: there the rows are
stepped one at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .decoder import BatchKVCache

if TYPE_CHECKING:
    from .captioner import Captioner, Generation

# Sequences decoded together by default (generate_batch, `caption --batch-size`, `serve --max-batch`). On the 2-core
# CPU measured, aggregate 4B int4 decode tokens/s over one sequence: 1.8x at 2, 2.2x at 4, 2.6x at 8 on a quiet
# machine (benchmarks/results/batch-4b-int4-decode-quiet-2026-12-04.json); 2.1x / 2.8x / 2.7x under load
# (batch-4b-int4-decode-2026-12-04.json). 8 adds about 15% over 4 for twice the KV memory, so 4.
DEFAULT_MAX_BATCH = 4


class DecodeBatch:
    """Up to `max_batch` `Generation`s decoded together; `join` and `leave` between steps, `step` for one token each.

    The batch takes over each joined generation's KV positions (its `state.cache` becomes None) and writes every
    step's logits into its `state.logits`.
    """

    def __init__(self, captioner: Captioner, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.captioner = captioner
        self.max_batch = max_batch
        self.members: list[Generation] = []  # in row order
        step_plan = (captioner.manifest.data.get("plan") or {}).get("decoder_step", {})
        self.rows_independent = step_plan.get("kind") != "int8"
        self._cache: BatchKVCache | None = None

    def __len__(self) -> int:
        return len(self.members)

    @property
    def full(self) -> bool:
        return len(self.members) >= self.max_batch

    def join(self, generation: Generation) -> None:
        """Add a generation fresh from `Captioner.start` (or stepped alone so far); it takes part from the next step."""
        if self.full:
            raise ValueError(f"the batch already decodes {self.max_batch} sequences")
        cache = generation.state.cache
        if cache is None:
            raise ValueError("this generation already belongs to a batch")
        if self._cache is None:
            self._cache = self.captioner.decoder.new_batch_cache(self.max_batch, cache.capacity)
        self._cache.add(cache)
        generation.state.cache = None  # its positions live in the batch now; the single cache can go
        self.members.append(generation)

    def leave(self, generation: Generation) -> None:
        """Drop a generation (finished, or given up on); the others keep their rows' contents."""
        row = self.members.index(generation)
        self._cache.remove(row)
        self.members[row] = self.members[-1]
        self.members.pop()

    def step(self) -> list[Generation]:
        """Each member picks its next token; those that finish (or whose `on_text` raised, kept in `error`) leave,
        the rest are fed their tokens in one decoder run. Returns the generations that left."""
        left, tokens = [], {}
        for generation in list(self.members):
            try:
                token = generation.next_token()
            except Exception as exc:  # noqa: BLE001 - a streaming consumer's failure ends that answer only
                generation.error, token = exc, None
            if token is None:
                self.leave(generation)
                left.append(generation)
            else:
                tokens[id(generation)] = token
        if self.members:
            ids = np.array([[tokens[id(generation)]] for generation in self.members], dtype=np.int64)  # [n, 1]
            embeds = self.captioner.embed(ids)  # [n, 1, H]
            if self.rows_independent:
                logits = self.captioner.decoder.step_rows(embeds, self._cache)  # [n, vocab]
            else:
                logits = [self.captioner.decoder.step_rows(embeds[row:row + 1], self._cache, row)[0]
                          for row in range(len(self.members))]
            for generation, row_logits in zip(self.members, logits):
                generation.state.logits = row_logits
        return left
