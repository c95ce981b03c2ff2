"""Export plans: which precision and kernel each part of Molmo2 gets, per `--quant` mode.

The choice follows measurements on this project's CPUs (`benchmarks/bench_kernels.py`, `benchmarks/bench_cpu.py`):
the vision encoder, the adapter and the prefill are bound by arithmetic, where int8 GEMM with dynamically
quantized activations is the fastest kernel; a decode step is bound by the bytes of weights it reads, where 4-bit
MatMulNBits reads the fewest. `int4` keeps one copy of the decoder in 4 bits (least memory, slow prefill); `mixed`
adds an int8 copy of the decoder for the prefill (fast first token, more memory).

4-bit blocks of 128: on the 4B decoder a decode step took the same time as with blocks of 32, while the loaded
session needed 2.6 GB instead of 3.75 GB (MatMulNBits' int8-compute packing keeps per-block scales and sums).
"""

from __future__ import annotations

from dataclasses import dataclass

from .quantize import FP32, QuantLinear

INT8 = QuantLinear("int8")
INT4 = QuantLinear("nbits", bits=4, block_size=128, accuracy_level=4)


@dataclass(frozen=True)
class ExportPlan:
    """Per-part precision. `step` is None when one decoder graph serves both prefill and decode steps."""

    vision: QuantLinear
    adapter: QuantLinear
    prefill: QuantLinear
    step: QuantLinear | None
    lm_head: QuantLinear
    embed: str

    def to_dict(self) -> dict:
        return {"vision": self.vision.to_dict(), "adapter": self.adapter.to_dict(),
                "decoder_prefill": self.prefill.to_dict(),
                "decoder_step": (self.step or self.prefill).to_dict(),
                "lm_head": self.lm_head.to_dict(), "embed": self.embed}


PLANS = {
    "fp32": ExportPlan(FP32, FP32, FP32, None, FP32, "fp32"),
    "int8": ExportPlan(INT8, INT8, INT8, None, INT8, "int8"),
    "int4": ExportPlan(INT8, INT8, INT4, None, INT4, "int8"),
    "mixed": ExportPlan(INT8, INT8, INT8, INT4, INT4, "int8"),
}
