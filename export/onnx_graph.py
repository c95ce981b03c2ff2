"""A small ONNX graph builder that streams weights to an external-data file as they are added.

Weights never sit in the protobuf: each initializer is appended to `<model>.onnx.data` the moment it is created and
the graph keeps only its offset, so a layer's numpy arrays can be freed right after the layer is built. That keeps
export memory to about one layer and sidesteps protobuf's 2 GB limit for the full-size model.

A builder has one float type (`floats`: fp32, or fp16 for GPUs): float32 arrays given to `weight` and `const` are
stored in it, and a float32 input or output is cast to it on entry and back on exit, so the graph computes in its
float type while its callers feed and read float32 whatever the plan. Integer and quantized weights stay as given.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from molmocap.runtime.errors import ExportError

FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
OPSET = 17
_ALIGN = 64
_INLINE_BYTES = 1024


class GraphBuilder:
    """Collects nodes, inputs and outputs of one model; `save` writes `<name>.onnx` beside its data file."""

    def __init__(self, path: Path, floats: str = "fp32") -> None:
        self.path = Path(path)
        self.float_type = FLOAT_TYPES[floats]
        self._half = floats == "fp16"
        self.data_name = self.path.name + ".data"
        self._data = open(self.path.parent / self.data_name, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        """A unique value name derived from `hint`."""
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}__{n}"

    def input(self, name: str, dtype: int, shape: list) -> str:
        """Declare an input; returns the value the graph reads: a float32 input of a float16 graph is cast on entry
        (declare `float_type` for one that keeps the graph's type, the KV cache)."""
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        if dtype == TensorProto.FLOAT and self._half:
            return self.op("Cast", [name], hint=f"{name}.half", to=TensorProto.FLOAT16)
        return name

    def output(self, value: str, name: str, dtype: int, shape: list) -> str:
        """Expose `value` as graph output `name` (through an Identity when the names differ, through a Cast when a
        float16 graph declares a float32 output)."""
        if dtype == TensorProto.FLOAT and self._half:
            self.nodes.append(helper.make_node("Cast", [value], [name], to=TensorProto.FLOAT))
        elif value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (float32 stored in the graph's float type); large ones go to the external data file
        immediately. A float32 value beyond float16's range is an `ExportError`, not an infinity in the model."""
        array = np.asarray(array, order="C")
        if array.dtype == np.float32 and self._half:
            with np.errstate(over="ignore"):
                half = array.astype(np.float16)
            if np.isinf(half).any() and not np.isinf(array).any():
                raise ExportError(f"{name} holds values beyond float16's range; export it with a float32 plan")
            array = half
        name = self.fresh(name)
        if array.nbytes <= _INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        pad = (-self._data.tell()) % _ALIGN
        self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(memoryview(array.reshape(-1)).cast("B"))
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small shared constant (scalar or 1-D), deduplicated by value. In a float16 graph a float32 constant
        saturates to float16's finite range, so float32 min (the attention bias's "never") stays finite."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype == np.float32 and self._half:
            limit = np.finfo(np.float16).max
            array = np.clip(array, -limit, limit).astype(np.float16)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight("const", array)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Append one node; returns its output name (or names when `outputs` > 1)."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def save(self) -> None:
        """Write the graph; the data file already holds every large weight."""
        self._data.close()
        graph = helper.make_graph(self.nodes, self.path.stem, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
            producer_name="molmocap",
        )
        model.ir_version = 8
        with open(self.path, "wb") as f:
            f.write(model.SerializeToString())
        if os.path.getsize(self.path.parent / self.data_name) == 0:
            os.remove(self.path.parent / self.data_name)
            self.data_name = ""
