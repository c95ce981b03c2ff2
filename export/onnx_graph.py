"""A small ONNX graph builder that streams weights to an external-data file as they are added.

Weights never sit in the protobuf: each initializer is appended to `<model>.onnx.data` the moment it is created and
the graph keeps only its offset, so a layer's numpy arrays can be freed right after the layer is built. That keeps
export memory to about one layer and sidesteps protobuf's 2 GB limit for the full-size model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_ALIGN = 64
_INLINE_BYTES = 1024


class GraphBuilder:
    """Collects nodes, inputs and outputs of one model; `save` writes `<name>.onnx` beside its data file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
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
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, value: str, name: str, dtype: int, shape: list) -> str:
        """Expose `value` as graph output `name` (through an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; large ones go to the external data file immediately."""
        array = np.asarray(array, order="C")
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
        """A small shared constant (scalar or 1-D), deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
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
