"""KV-cached greedy decoding over the exported text decoder, with Molmo2's prefill attention rule."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnxruntime as ort

NEG_INF = np.finfo(np.float32).min


def prefill_bias(ids: np.ndarray, structure_ids: list[int], start: int = 0) -> np.ndarray:
    """Additive attention bias [1, 1, S - start, S] for the positions from `start` on, over all S positions.

    Causal, except that all image-structure tokens see each other: Molmo2 lets every `<im_patch>`, `<im_col>` and
    image start/end token (of every image) attend bidirectionally within one block; text stays causal.
    """
    n = len(ids)
    rows = np.arange(start, n)[:, None]
    allowed = np.arange(n)[None, :] <= rows
    block = np.isin(ids, structure_ids)
    allowed |= block[start:, None] & block[None, :]
    return np.where(allowed, np.float32(0), NEG_INF).astype(np.float32)[None, None]


class KVCache:
    """Per-layer keys and values, [1, kv_heads, positions, head_dim] each."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int) -> None:
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        self.tensors = {f"past_key_values.{i}.{kind}": empty for i in range(layers) for kind in ("key", "value")}

    @property
    def length(self) -> int:
        return next(iter(self.tensors.values())).shape[2]

    def copy(self) -> "KVCache":
        """A cache that can grow independently (the arrays are never written in place, so sharing them is safe)."""
        other = KVCache.__new__(KVCache)
        other.tensors = dict(self.tensors)
        return other

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        for name in self.tensors:
            self.tensors[name] = outputs[name.replace("past_key_values.", "present.")]


class Decoder:
    """Runs the decoder: a prefill over the prompt, then one token at a time.

    A model exported with the `mixed` plan has a second graph for single-token steps (4-bit weights, fewest bytes
    per token) beside the prefill graph (int8, fastest GEMM); otherwise one graph does both.
    """

    def __init__(self, session: ort.InferenceSession, geometry: dict,
                 step_session: ort.InferenceSession | None = None) -> None:
        self.session = session
        self.step_session = step_session or session
        self.geometry = geometry
        self.output_names = [o.name for o in session.get_outputs()]

    def new_cache(self) -> KVCache:
        g = self.geometry
        return KVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"])

    def forward(self, embeds: np.ndarray, bias: np.ndarray, cache: KVCache) -> np.ndarray:
        """Feed `embeds` [1, S, H] after the cached positions; returns the last position's logits [vocab]."""
        start = cache.length
        positions = np.arange(start, start + embeds.shape[1], dtype=np.int64)[None]
        feeds = {"inputs_embeds": embeds, "position_ids": positions, "attention_bias": bias, **cache.tensors}
        session = self.step_session if embeds.shape[1] == 1 else self.session
        outputs = dict(zip(self.output_names, session.run(self.output_names, feeds)))
        cache.update(outputs)
        return outputs["logits"][0]

    def greedy(self, first_logits: np.ndarray, cache: KVCache, embed: Callable[[np.ndarray], np.ndarray],
               max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        """Yield greedy tokens until a stop token (not yielded) or `max_new_tokens`."""
        logits = first_logits
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token in stop_ids:
                return
            yield token
            if step + 1 == max_new_tokens:
                return
            bias = np.zeros((1, 1, 1, cache.length + 1), dtype=np.float32)
            logits = self.forward(embed(np.array([[token]], dtype=np.int64)), bias, cache)
