"""The exported text decoder over a KV cache that stays where the decoder runs, with Molmo2's prefill attention rule."""

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
    """Per-layer key/value buffers [rows, kv_heads, capacity, head_dim] on the decoder's device, allocated once.

    Row r holds one sequence, `lengths[r]` positions of it. A decoder run binds a block of rows by address as both
    its past input and its present output, so GroupQueryAttention writes the new positions in place and nothing is
    copied per token, on the CPU as on a GPU. Positions past a row's length are never read (GroupQueryAttention stops
    at seqlens_k[r], and the bias masks them too), so a reused row needs no clearing.

    On the CPU the buffers are the numpy arrays in `arrays`. On a GPU they live in device memory; only copying rows
    between caches (`copy`, `copy_row`, `grow`: a sequence joining a batch it was not prefilled into, a reused image
    prefix) goes through host memory, never a decode step.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, rows: int = 1,
                 dtype: np.dtype = np.float32, device: str = "cpu") -> None:
        self.shape = (rows, kv_heads, capacity, head_dim)
        self.dtype = np.dtype(dtype)
        self.device = device
        self.names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        self.lengths = [0] * rows
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        for name in self.names:
            self._store(name, np.zeros(self.shape, dtype=self.dtype))

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def length(self) -> int:
        """Positions in use in row 0 (the one row of a single sequence's cache)."""
        return self.lengths[0]

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    def bind(self, binding: ort.IOBinding, start: int, stop: int) -> None:
        """Bind rows start .. stop - 1 of every buffer as the run's past inputs and present outputs (no copy)."""
        rows_shape = [stop - start, *self.shape[1:]]
        offset = start * int(np.prod(self.shape[1:])) * self.dtype.itemsize
        for name in self.names:
            pointer = self.values[name].data_ptr() + offset
            binding.bind_input(name, self.device, 0, self.dtype.type, rows_shape, pointer)
            binding.bind_output(name.replace("past_key_values.", "present."), self.device, 0, self.dtype.type,
                                rows_shape, pointer)

    def copy_row(self, source: KVCache, source_row: int, row: int) -> None:
        """Copy the positions in use of `source`'s row `source_row` into this cache's row `row`."""
        length = source.lengths[source_row]
        if length > self.capacity:
            raise ValueError(f"a cache of {self.capacity} positions cannot hold {length}")
        for name in self.names:
            target = self._host(name)
            target[row, :, :length] = source._host(name)[source_row, :, :length]
            self._store(name, target)
        self.lengths[row] = length

    def copy(self, capacity: int | None = None, row: int = 0) -> KVCache:
        """A one-row cache holding the positions of `row`, with room for `capacity` (default: just those)."""
        other = KVCache(len(self.names) // 2, self.shape[1], self.shape[3], capacity or self.lengths[row],
                        dtype=self.dtype, device=self.device)
        other.copy_row(self, row, 0)
        return other

    def grow(self, capacity: int) -> None:
        """Make every row hold `capacity` positions, keeping their contents."""
        old = self.capacity
        self.shape = (self.shape[0], self.shape[1], capacity, self.shape[3])
        for name in self.names:
            array = np.zeros(self.shape, dtype=self.dtype)
            array[:, :, :old] = self._host(name)
            self._store(name, array)

    def _host(self, name: str) -> np.ndarray:
        """The buffer `name` in host memory: the array itself on the CPU, a copy from the device otherwise."""
        return self.arrays[name] if self.device == "cpu" else self.values[name].numpy()

    def _store(self, name: str, array: np.ndarray) -> None:
        """Make `array` the contents of buffer `name` (on the CPU: the buffer itself, shared with ONNX Runtime)."""
        if self.device == "cpu":
            if self.arrays.get(name) is not array:
                self.arrays[name] = array
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        elif name in self.values and self.values[name].shape() == list(array.shape):
            self.values[name].update_inplace(array)
        else:
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)


class Logits:
    """A decoder run's next-token logits [rows, vocab], left where the run wrote them (device memory on a GPU, until
    read), with each row's greedy token when the graph computes it (an `ArgMax` output, so a GPU decode step sends
    back one integer per row instead of the vocabulary's logits)."""

    def __init__(self, value: ort.OrtValue, tokens: np.ndarray | None = None) -> None:
        self._value = value
        self._tokens = tokens
        self._host: np.ndarray | None = None

    def numpy(self) -> np.ndarray:
        """The logits [rows, vocab] in host memory (copied once)."""
        if self._host is None:
            self._host = self._value.numpy()
        return self._host

    def token(self, row: int = 0) -> int:
        """Row `row`'s greedy token: the first highest logit, as `np.argmax` picks it."""
        if self._tokens is not None:
            return int(self._tokens[row])
        return int(np.argmax(self.numpy()[row]))


class Decoder:
    """Runs the decoder graph over new positions of rows of a `KVCache`: a prefill over a prompt, then one token at
    a time, for one sequence or several side by side.

    A model exported with the `mixed` plan has a second graph for single-token steps (4-bit weights, fewest bytes
    per token) beside the prefill graph (int8, fastest GEMM); otherwise one graph does both.
    """

    def __init__(self, session: ort.InferenceSession, geometry: dict,
                 step_session: ort.InferenceSession | None = None) -> None:
        self.session = session
        self.step_session = step_session or session
        self.geometry = geometry
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        past = next(arg for arg in session.get_inputs() if arg.name == "past_key_values.0.key")
        self.kv_dtype = np.dtype(np.float16 if past.type == "tensor(float16)" else np.float32)
        self._greedy = {id(s): any(arg.name == "next_token" for arg in s.get_outputs())
                        for s in (self.session, self.step_session)}
        self._zeros = np.zeros((1, 1, 1, 0), dtype=np.float32)

    def new_cache(self, capacity: int, rows: int = 1) -> KVCache:
        """A cache of `rows` empty rows of `capacity` positions, on this decoder's device."""
        g = self.geometry
        return KVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], capacity, rows, self.kv_dtype, self.device)

    def forward(self, embeds: np.ndarray, bias: np.ndarray, cache: KVCache, row: int = 0) -> Logits:
        """Feed `embeds` [1, S, H] after the positions in `row` of `cache`, under `bias` [1, 1, S, length + S];
        returns the last position's logits."""
        total = cache.lengths[row] + embeds.shape[1]
        if total > cache.capacity:
            raise ValueError(f"{total} positions do not fit a KV cache of {cache.capacity}")
        session = self.step_session if embeds.shape[1] == 1 else self.session
        logits = self._run(session, embeds, bias, np.array([total - 1], dtype=np.int32), total, cache, row, row + 1)
        cache.lengths[row] = total
        return logits

    def step(self, embeds: np.ndarray, cache: KVCache, row: int = 0) -> Logits:
        """One decode position: `embeds` [1, 1, H] attends to every position of `row` and itself."""
        return self.forward(embeds, self._zero_bias(cache.lengths[row] + 1), cache, row)

    def step_rows(self, embeds: np.ndarray, cache: KVCache, start: int = 0) -> Logits:
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
        logits = self._run(self.step_session, embeds, bias.astype(np.float32)[:, None, None, :], lengths, total,
                           cache, start, start + rows)
        for row in range(start, start + rows):
            cache.lengths[row] += 1
        return logits

    def _run(self, session: ort.InferenceSession, embeds: np.ndarray, bias: np.ndarray, seqlens: np.ndarray,
             total: int, cache: KVCache, start: int, stop: int) -> Logits:
        binding = session.io_binding()
        binding.bind_output("logits", self.device)  # stays on the device; read only if asked for
        greedy = self._greedy[id(session)]
        if greedy:
            binding.bind_output("next_token")
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_bias", bias)
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        cache.bind(binding, start, stop)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return Logits(outputs[0], outputs[1].numpy() if greedy else None)

    def _zero_bias(self, total: int) -> np.ndarray:
        """[1, 1, 1, total] zeros (a decode step sees every position), from one buffer grown as needed."""
        if self._zeros.shape[-1] < total:
            self._zeros = np.zeros((1, 1, 1, max(total, 2 * self._zeros.shape[-1])), dtype=np.float32)
        return self._zeros[..., :total]
