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


def test_cache_grows_with_present_tensors():
    cache = KVCache(layers=2, kv_heads=3, head_dim=4)
    assert cache.length == 0 and len(cache.tensors) == 4
    present = {f"present.{i}.{k}": np.ones((1, 3, 7, 4), np.float32) for i in range(2) for k in ("key", "value")}
    cache.update(present)
    assert cache.length == 7
