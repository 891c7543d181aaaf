"""Relax modules of a model's decode step through TVM's two frontends: torch.export and ONNX."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tvm


def _matmul_in_input_dtype(node: Any, importer: Any) -> Any:
    from tvm import relax

    x, y = importer.retrieve_args(node)[:2]
    return importer.block_builder.emit(relax.op.matmul(x, y))


# TVM 0.27's torch frontend gives every mm/bmm/matmul out_dtype="float32": a bf16 model then concatenates
# float32 keys with its bf16 cache and fails to import. These converters keep the inputs' dtype.
MATMUL_CONVERTERS = {name: _matmul_in_input_dtype for name in ("mm.default", "bmm.default", "matmul.default")}


def from_torch(program: Any, keep_params_as_input: bool = False) -> tvm.IRModule:
    """`relax.frontend.torch.from_exported_program` (default decompositions; matmuls keep their dtype)."""
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(program, keep_params_as_input=keep_params_as_input,
                                 custom_convert_map=dict(MATMUL_CONVERTERS))


def fix_scalar_unsqueeze_axes(model: Any) -> int:
    """Make 0-d `axes` initializers of Unsqueeze nodes 1-d, in place; returns how many were changed.

    torch's ONNX exporter writes GQA's `unsqueeze(2)` with a scalar axes tensor, which onnxruntime
    accepts and TVM 0.27's ONNX frontend rejects (`'int' object is not iterable`).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    fixed = set()
    for node in model.graph.node:
        if node.op_type == "Unsqueeze" and len(node.input) > 1 and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            if arr.ndim == 0:
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(arr.reshape(1), node.input[1]))
                fixed.add(node.input[1])
    return len(fixed)


def from_onnx(model: Any, keep_params_in_input: bool = False) -> tvm.IRModule:
    """`relax.frontend.onnx.from_onnx` of an ONNX model or file, after `fix_scalar_unsqueeze_axes` (on a copy of
    a model passed in)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx as _from_onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    else:  # the caller's model stays as it was
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    fix_scalar_unsqueeze_axes(model)
    return _from_onnx(model, keep_params_in_input=keep_params_in_input)
