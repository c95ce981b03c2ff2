"""The exported text decoder over a KV cache written in place, with Molmo2's prefill attention rule."""

from __future__ import annotations

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
    """Per-layer key/value buffers [1, kv_heads, capacity, head_dim], allocated once for the whole answer.

    The decoder graph writes each new position into them in place (past and present bound to the same buffer), so a
    step reads the cache without copying it; `length` positions are in use.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int) -> None:
        self.arrays = {f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, capacity, head_dim), dtype=np.float32)
                       for i in range(layers) for kind in ("key", "value")}
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}
        self.step_bias = np.zeros((1, 1, 1, capacity), dtype=np.float32)  # a decode step sees every position
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.step_bias.shape[-1]

    def copy(self, capacity: int | None = None) -> "KVCache":
        """An independent cache holding the same positions, with room for `capacity` (default: just those)."""
        first = next(iter(self.arrays.values()))
        other = KVCache(len(self.arrays) // 2, first.shape[1], first.shape[3], capacity or self.length)
        if other.capacity < self.length:
            raise ValueError(f"a cache of {other.capacity} positions cannot hold {self.length}")
        for name, array in self.arrays.items():
            other.arrays[name][:, :, : self.length] = array[:, :, : self.length]
        other.length = self.length
        return other


class Decoder:
    """Runs the decoder graph over new positions of a `KVCache`: a prefill over the prompt, then one token at a time.

    A model exported with the `mixed` plan has a second graph for single-token steps (4-bit weights, fewest bytes
    per token) beside the prefill graph (int8, fastest GEMM); otherwise one graph does both.
    """

    def __init__(self, session: ort.InferenceSession, geometry: dict,
                 step_session: ort.InferenceSession | None = None) -> None:
        self.session = session
        self.step_session = step_session or session
        self.geometry = geometry

    def new_cache(self, capacity: int) -> KVCache:
        g = self.geometry
        return KVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], capacity)

    def forward(self, embeds: np.ndarray, bias: np.ndarray, cache: KVCache) -> np.ndarray:
        """Feed `embeds` [1, S, H] after the cached positions, under `bias` [1, 1, S, length + S]; returns the last
        position's logits [vocab]."""
        total = cache.length + embeds.shape[1]
        if total > cache.capacity:
            raise ValueError(f"{total} positions do not fit a KV cache of {cache.capacity}")
        session = self.step_session if embeds.shape[1] == 1 else self.session
        binding = session.io_binding()
        binding.bind_output("logits")
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_bias", bias)
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        for name, value in cache.values.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        session.run_with_iobinding(binding)
        cache.length = total
        return binding.get_outputs()[0].numpy()[0]

    def step(self, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """One decode position: `embeds` [1, 1, H] attends to every cached position and itself."""
        return self.forward(embeds, cache.step_bias[..., : cache.length + 1], cache)
