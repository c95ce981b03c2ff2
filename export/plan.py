"""Export plans: which precision and kernel each part of Molmo2 gets, per `--quant` mode.

The choice follows measurements on this project's CPUs (`benchmarks/bench_kernels.py`, `benchmarks/bench_cpu.py`):
the vision encoder, the adapter and the prefill are bound by arithmetic, where int8 GEMM with dynamically
quantized activations is the fastest kernel; a decode step is bound by the bytes of weights it reads, where 4-bit
MatMulNBits reads the fewest. `int4` keeps one copy of the decoder in 4 bits (least memory, slow prefill); `mixed`
adds an int8 copy of the decoder for the prefill (fast first token, more memory).

4-bit blocks of 128: on the 4B decoder a decode step took the same time as with blocks of 32, while the loaded
session needed 2.6 GB instead of 3.75 GB (MatMulNBits' int8-compute packing keeps per-block scales and sums).

Parts of a 4-bit decoder that a plan keeps at 8 bits (the lm_head, the first and last layers) use MatMulNBits'
8-bit blocks rather than int8 DynamicQuantizeMatMul: at one row (a decode step) it read the 4B's largest projection
in 1.8 ms against 3.9 ms, with a smaller error (`benchmarks/results/kernels-2026-12-04.json`).

`fp16` and `int4-fp16` are for GPUs: every graph computes in float16 (`floats`) and the KV cache is float16, which
halves the bytes a decode step reads from it; `int4-fp16` keeps the 4-bit decoder and lm_head (MatMulNBits with
float16 scales). int8 has no place in them: ONNX Runtime's DynamicQuantizeMatMul takes float32 only. On a CPU they
run, but the x86 CPU provider has no float16 MatMul: it casts those weights (and the products) to float32 at load.
Their decoder gives GroupQueryAttention no attention bias, which the CUDA kernel refuses (`text.build_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .quantize import FLOAT_KINDS, FP16, FP32, QuantLinear

INT8 = QuantLinear("int8")
INT4 = QuantLinear("nbits", bits=4, block_size=128, accuracy_level=4)
INT8_BLOCKS = QuantLinear("nbits", bits=8, block_size=128, accuracy_level=4)


@dataclass(frozen=True)
class ExportPlan:
    """Per-part precision. `step` is None when one decoder graph serves both prefill and decode steps. The first and
    last `edge_layers` decoder layers use `edge` instead of the decoder's precision (in every decoder graph).
    `floats` is every graph's float type (fp32 or fp16): its float weights, activations and KV cache; a float
    linear's kind and a float embedding table must name it."""

    vision: QuantLinear
    adapter: QuantLinear
    prefill: QuantLinear
    step: QuantLinear | None
    lm_head: QuantLinear
    embed: str
    edge_layers: int = 0
    edge: QuantLinear = INT8_BLOCKS
    floats: str = "fp32"

    def __post_init__(self) -> None:
        hows = [self.vision, self.adapter, self.prefill, self.step or self.prefill, self.lm_head]
        if self.edge_layers:
            hows.append(self.edge)
        other = ({how.kind for how in hows} | {self.embed}) & set(FLOAT_KINDS) - {self.floats}
        if other:
            raise ValueError(f"a plan computing in {self.floats} cannot have {', '.join(sorted(other))} parts")
        if self.floats != "fp32" and "int8" in {how.kind for how in hows}:
            raise ValueError("int8 layers (DynamicQuantizeMatMul) take float32 activations only")

    def edge_indices(self, num_layers: int) -> list[int]:
        """The decoder layers (0-based) that `edge` applies to."""
        count = min(self.edge_layers, num_layers)
        return sorted(set(range(count)) | set(range(num_layers - count, num_layers)))

    def decoder_layers(self, how: QuantLinear, num_layers: int) -> list[QuantLinear]:
        """Each decoder layer's precision in a decoder whose layers are otherwise `how`."""
        edges = set(self.edge_indices(num_layers))
        return [self.edge if i in edges else how for i in range(num_layers)]

    def to_dict(self, num_layers: int) -> dict:
        """The plan as the manifest records it, for a decoder of `num_layers` layers."""
        plan = {"vision": self.vision.to_dict(), "adapter": self.adapter.to_dict(),
                "decoder_prefill": self.prefill.to_dict(),
                "decoder_step": (self.step or self.prefill).to_dict(),
                "lm_head": self.lm_head.to_dict(), "embed": self.embed}
        if self.edge_layers:
            plan["decoder_edge_layers"] = {**self.edge.to_dict(), "layers": self.edge_indices(num_layers)}
        if self.floats != "fp32":
            plan["floats"] = self.floats
        return plan


PLANS = {
    "fp32": ExportPlan(FP32, FP32, FP32, None, FP32, "fp32"),
    "int8": ExportPlan(INT8, INT8, INT8, None, INT8, "int8"),
    "int4": ExportPlan(INT8, INT8, INT4, None, INT4, "int8"),
    "mixed": ExportPlan(INT8, INT8, INT8, INT4, INT4, "int8"),
    "fp16": ExportPlan(FP16, FP16, FP16, None, FP16, "fp16", floats="fp16"),
    "int4-fp16": ExportPlan(FP16, FP16, INT4, None, INT4, "fp16", floats="fp16"),
}
