"""Molmo2's prefill attention rule and the KV cache bookkeeping."""

from __future__ import annotations

import numpy as np

from molmocap.runtime.decoder import NEG_INF, KVCache, prefill_bias

TEXT, PATCH, COL, START, END = 5, 100, 101, 102, 103


def test_image_block_is_bidirectional_and_text_is_causal():
    ids = np.array([0, START, PATCH, COL, PATCH, END, TEXT, TEXT])
    allowed = prefill_bias(ids, [PATCH, COL, START, END])[0, 0] == 0
    image = slice(1, 6)
    assert allowed[image, image].all()
    assert not allowed[0, 1:].any()
    assert allowed[6, :7].all() and not allowed[6, 7]
    assert allowed[7].all()
    assert not allowed[1:6, 6:].any()
    assert np.tril(allowed).sum() == allowed.shape[0] * (allowed.shape[0] + 1) // 2


def test_bias_values_are_zero_or_float32_min():
    bias = prefill_bias(np.array([1, 2, 3]), [])
    assert bias.dtype == np.float32 and bias.shape == (1, 1, 3, 3)
    assert set(np.unique(bias)) == {0.0, NEG_INF}


def test_cache_copy_keeps_the_positions_in_use_with_new_room():
    cache = KVCache(layers=2, kv_heads=3, head_dim=4, capacity=10)
    assert cache.length == 0 and cache.capacity == 10 and len(cache.arrays) == 4
    for array in cache.arrays.values():
        array[:, :, :6] = np.arange(6, dtype=np.float32)[:, None]
    cache.length = 6
    bigger, exact = cache.copy(16), cache.copy()
    assert (bigger.capacity, bigger.length, exact.capacity, exact.length) == (16, 6, 6, 6)
    for name, array in cache.arrays.items():
        assert bigger.arrays[name] is not array
        np.testing.assert_array_equal(bigger.arrays[name][:, :, :6], array[:, :, :6])
        np.testing.assert_array_equal(exact.arrays[name], array[:, :, :6])
        assert not bigger.arrays[name][:, :, 6:].any()
