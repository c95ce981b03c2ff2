"""RoPE inverse frequencies and attention scaling in numpy, as transformers' `Molmo2RotaryEmbedding` builds them.

The layers in `rope_scaling_layers` use the checkpoint's `rope_parameters` (`scaled`); the others use plain RoPE
with the same theta (`unscaled`). Each float32 step follows transformers' torch code in the same order (a python
scalar meets a float32 tensor as float32; `a / t` is `a * (1 / t)`), so the tables match its values.
"""

from __future__ import annotations

import math

import numpy as np

from molmocap.runtime.errors import ExportError

STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
F32 = np.float32


def _powers(theta: float, dim: int) -> np.ndarray:
    """theta^(2i/dim) in float32: float32 base and exponent, the power rounded once from float64."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)
    return (np.float64(F32(theta)) ** exponent.astype(np.float64)).astype(F32)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return np.reciprocal(_powers(theta, dim))


def _linear(params: dict, dim: int) -> tuple[np.ndarray, float]:
    return _base_inv_freq(params["rope_theta"], dim) / F32(params["factor"]), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: dict, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    base, original = params["rope_theta"], params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = _powers(base, dim)
    extrapolation = np.reciprocal(pos_freqs)
    interpolation = np.reciprocal(F32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), F32(0), F32(1))
    extrapolation_factor = F32(1) - ramp
    inv_freq = interpolation * (F32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(F32), attention_factor


def _llama3(params: dict, dim: int) -> tuple[np.ndarray, float]:
    inv_freq = _base_inv_freq(params["rope_theta"], dim)
    factor, low_factor, high_factor = F32(params["factor"]), params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = F32(context / low_factor), F32(context / high_factor)
    wavelen = np.reciprocal(inv_freq) * F32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (np.reciprocal(wavelen) * F32(context) - F32(low_factor)) / F32(high_factor - low_factor)
    smoothed = (F32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(F32), 1.0


def rope_tables(text_config) -> dict[str, tuple[np.ndarray, float]]:
    """{"scaled": (inv_freq, attention_scaling), "unscaled": (...)} for the decoder's two kinds of layers."""
    params = text_config.rope_parameters
    rope_type, dim = params.get("rope_type", "default"), text_config.head_dim
    if rope_type not in STATIC_ROPE_TYPES:
        raise ExportError(f"rope_type {rope_type!r} depends on sequence length and is not supported")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError("partial rotary embeddings (partial_rotary_factor) are not supported")
    try:
        if rope_type == "linear":
            scaled = _linear(params, dim)
        elif rope_type == "yarn":
            scaled = _yarn(params, dim, text_config.max_position_embeddings)
        elif rope_type == "llama3":
            scaled = _llama3(params, dim)
        else:
            scaled = (_base_inv_freq(params["rope_theta"], dim), 1.0)
    except KeyError as exc:
        raise ExportError(f"rope_parameters of type {rope_type!r} lack {exc}") from None
    return {"scaled": scaled, "unscaled": (_base_inv_freq(params["rope_theta"], dim), 1.0)}
