"""What OpenVINO computes for an int8 QDQ graph, as a graph onnxruntime can run: the yardstick
that tells OpenVINO's own arithmetic from an export error.

OpenVINO's CPU plugin fuses a residual block's Conv -> QuantizeLinear -> DequantizeLinear -> Add ->
QuantizeLinear into one convolution kernel with a sum post-op, and in that kernel it drops the
first quantization's rounding on purpose ("drop rounding one special residual pattern", its
`Convolution::setPostOps`): the conv's output enters the sum unrounded. So OpenVINO's logits
differ from the graph's (and from onnxruntime's, which follows the graph exactly) by up to a
rounding step at every residual sum; no exporter can change that without giving up the fused
kernel. `openvino_reference` removes exactly those roundings, read from OpenVINO's compiled model,
so that onnxruntime computes what OpenVINO computes, up to float summation order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qatkd.export.runtime import openvino_compiled


def dropped_roundings(path: str | Path) -> list[str]:
    """The QuantizeLinear outputs of the graph at `path` whose rounding OpenVINO drops: those of
    a Conv's output that OpenVINO fused, with the Add it feeds and a later quantization, into
    one convolution kernel (its runtime model, compiled for a batch of one, names the layers
    each kernel fused)."""
    graph = onnx.load(str(path)).graph
    made_by = {out: node for node in graph.node for out in node.output}
    read_by: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            read_by.setdefault(name, []).append(node)
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    one = [1, *(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])]
    kernels = [
        set(op.get_rt_info()["originalLayersNames"].astype(str).split(","))
        for op in openvino_compiled(path, one).get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    ]
    dropped = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or made_by.get(q.input[0], q).op_type != "Conv":
            continue
        adds = [
            add.output[0]
            for dq in read_by.get(q.output[0], [])
            if dq.op_type == "DequantizeLinear"
            for add in read_by.get(dq.output[0], [])
            if add.op_type == "Add"
        ]
        for fused in kernels:
            later = (fused & quantized) - {q.output[0]}
            if q.output[0] in fused and fused.intersection(adds) and later:
                dropped.append(q.output[0])
                break
    return dropped


def openvino_reference(path: str | Path) -> onnx.ModelProto:
    """The graph at `path` without the roundings OpenVINO drops (`dropped_roundings`): the
    residual Add that reads each such quantization's DequantizeLinear reads a Clip of the
    unrounded tensor to the codes' range instead, as OpenVINO keeps the clipping and drops only
    the rounding, and only inside the fused sum (another reader keeps the rounded tensor)."""
    model = onnx.load(str(path))
    graph = model.graph
    dropped = set(dropped_roundings(path))
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes, clipped = [], {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in dropped:
            scale, zero_point = constants[node.input[1]], constants[node.input[2]]
            codes = np.iinfo(zero_point.dtype)
            clip = node.output[0] + "_unrounded"
            for end, code in (("low", codes.min), ("high", codes.max)):
                value = (np.float32(code) - zero_point.astype(np.float32)) * scale
                graph.initializer.append(numpy_helper.from_array(value, f"{clip}_{end}"))
            ends = [f"{clip}_low", f"{clip}_high"]
            nodes.append(onnx.helper.make_node("Clip", [node.input[0], *ends], [clip]))
            clipped[node.output[0]] = clip
        nodes.append(node)
    bypass = {
        node.output[0]: clipped[node.input[0]]
        for node in nodes
        if node.op_type == "DequantizeLinear" and node.input[0] in clipped
    }
    for node in nodes:
        if node.op_type == "Add":
            node.input[:] = [bypass.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    return model
