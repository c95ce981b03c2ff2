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

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: type = np.float32) -> None:
        self.arrays = {f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, capacity, head_dim), dtype=dtype)
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
        other = KVCache(len(self.arrays) // 2, first.shape[1], first.shape[3], capacity or self.length, first.dtype)
        if other.capacity < self.length:
            raise ValueError(f"a cache of {other.capacity} positions cannot hold {self.length}")
        for name, array in self.arrays.items():
            other.arrays[name][:, :, : self.length] = array[:, :, : self.length]
        other.length = self.length
        return other


class BatchKVCache:
    """Per-layer key/value buffers [slots, kv_heads, capacity, head_dim] for sequences decoded side by side.

    Rows 0 .. rows - 1 are in use, row r holding `lengths[r]` positions of its own sequence (each prefilled alone
    and copied in with `add`); a removed row is filled by moving the last one into it, so the rows in use stay a
    leading block of the buffer, which a step binds without copying (a leading slice of a C-contiguous array is
    contiguous). Positions past a row's length are never read (GroupQueryAttention stops at seqlens_k[r], and the
    step's bias masks them too), so a reused row needs no clearing.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int,
                 dtype: type = np.float32) -> None:
        self.shape = (slots, kv_heads, capacity, head_dim)
        self.names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        self.arrays = {name: np.zeros(self.shape, dtype=dtype) for name in self.names}  # pages touched on use
        self.lengths: list[int] = []
        self._bound: dict[tuple[int, int], dict[str, ort.OrtValue]] = {}

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add(self, cache: KVCache) -> int:
        """Copy the positions of a single sequence's `cache` into the next free row (made longer if the sequence's
        capacity needs it); returns the row."""
        if self.rows == self.shape[0]:
            raise ValueError(f"all {self.shape[0]} rows of the batch cache are in use")
        if cache.capacity > self.capacity:
            self._grow(cache.capacity)
        row = self.rows
        for name in self.names:
            self.arrays[name][row, :, : cache.length] = cache.arrays[name][0, :, : cache.length]
        self.lengths.append(cache.length)
        return row

    def remove(self, row: int) -> None:
        """Free `row`: the last row in use moves into it (only its positions in use are copied)."""
        last = self.rows - 1
        if row != last:
            length = self.lengths[last]
            for array in self.arrays.values():
                array[row, :, :length] = array[last, :, :length]
            self.lengths[row] = length
        self.lengths.pop()

    def values(self, start: int, stop: int) -> dict[str, ort.OrtValue]:
        """OrtValues over rows start .. stop - 1 of every buffer, sharing their memory (made once per range)."""
        if (start, stop) not in self._bound:
            self._bound[start, stop] = {name: ort.OrtValue.ortvalue_from_numpy(array[start:stop])
                                        for name, array in self.arrays.items()}
        return self._bound[start, stop]

    def _grow(self, capacity: int) -> None:
        slots, kv_heads, old, head_dim = self.shape
        self.shape = (slots, kv_heads, capacity, head_dim)
        for name in self.names:
            array = np.zeros(self.shape, dtype=self.arrays[name].dtype)
            array[: self.rows, :, :old] = self.arrays[name][: self.rows]
            self.arrays[name] = array
        self._bound.clear()


class Decoder:
    """Runs the decoder graph over new positions of a `KVCache`: a prefill over the prompt, then one token at a time.

    A model exported with the `mixed` plan has a second graph for single-token steps (4-bit weights, fewest bytes
    per token) beside the prefill graph (int8, fastest GEMM); otherwise one graph does both. `kv_dtype` is the
    cache's element type, the one the graph declares (float16 from the GPU plans, else float32).
    """

    def __init__(self, session: ort.InferenceSession, geometry: dict,
                 step_session: ort.InferenceSession | None = None) -> None:
        self.session = session
        self.step_session = step_session or session
        self.geometry = geometry
        past = next(arg for arg in session.get_inputs() if arg.name == "past_key_values.0.key")
        self.kv_dtype = np.float16 if past.type == "tensor(float16)" else np.float32

    def new_cache(self, capacity: int) -> KVCache:
        g = self.geometry
        return KVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], capacity, self.kv_dtype)

    def new_batch_cache(self, slots: int, capacity: int) -> BatchKVCache:
        g = self.geometry
        return BatchKVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], slots, capacity, self.kv_dtype)

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

    def step_rows(self, embeds: np.ndarray, cache: BatchKVCache, start: int = 0) -> np.ndarray:
        """One decode position for each of the rows start .. start + n - 1 of `cache`, together: `embeds` [n, 1, H];
        returns their logits [n, vocab].

        Each row has its own length: GroupQueryAttention takes row r's rotary position and the end of its keys from
        seqlens_k[r], `total_sequence_length` is the longest row's, and the bias [n, 1, 1, total] masks each row's
        positions past its own end as well.
        """
        rows = embeds.shape[0]
        lengths = np.array(cache.lengths[start:start + rows], dtype=np.int32)  # [n] positions before this step
        if lengths.max() >= cache.capacity:
            raise ValueError(f"{lengths.max() + 1} positions do not fit a KV cache of {cache.capacity}")
        total = int(lengths.max()) + 1
        bias = np.where(np.arange(total)[None, :] <= lengths[:, None], np.float32(0), NEG_INF)  # [n, total]
        binding = self.step_session.io_binding()
        binding.bind_output("logits")
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_bias", bias.astype(np.float32)[:, None, None, :])
        binding.bind_cpu_input("seqlens_k", lengths)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        for name, value in cache.values(start, start + rows).items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.step_session.run_with_iobinding(binding)
        for row in range(start, start + rows):
            cache.lengths[row] += 1
        return binding.get_outputs()[0].numpy()
