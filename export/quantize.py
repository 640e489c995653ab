"""`--int8`: onnxruntime dynamic quantization of every MatMul weight, per channel, the tied head included."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize_int8(source: Path, target: Path) -> None:
    """Quantize MatMul weights to int8, then point embedding Gathers at the int8 tables (fp32 copies dropped)."""
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint at WARNING on root
    model = onnx.load(str(source))
    untie_heads(model)
    quantize_dynamic(model, target, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    model = onnx.load(str(target))
    rewire_gathers(model.graph)
    onnx.save_model(model, str(target))


def untie_heads(model: onnx.ModelProto) -> None:
    """Gemm(h, E, transB=1) on a table that a Gather also reads -> MatMul(h, Eᵀ): the int8 head then gets its own
    quantized weight instead of staying fp32 (docs/architecture.md, "ONNX graph rules"). Where the ids' rank is known,
    the Gather reads Eᵀ too (axis 1, then a Transpose), so after rewire_gathers no fp32 copy of E is left."""
    graph, inferred = model.graph, onnx.shape_inference.infer_shapes(model).graph
    initializers = {t.name: t for t in graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.input, *inferred.value_info]
             if v.type.tensor_type.HasField("shape")}
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    tied = {node.input[1] for node in graph.node if node.op_type == "Gemm" and len(node.input) == 2
            and node.input[1] in gathered and node.input[1] in initializers
            and {a.name: a.i for a in node.attribute} == {"transB": 1}}
    for table in tied:
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[table]).T.copy(),
                                                         f"{table}_head"))
    nodes = []
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gemm" and node.input[1] in tied:
            nodes.append(helper.make_node("MatMul", [node.input[0], f"{node.input[1]}_head"], list(node.output),
                                          name=node.name))
        elif node.op_type == "Gather" and node.input[0] in tied and axis == 0 and node.input[1] in ranks:
            (table, ids), out = node.input, node.output[0]
            nodes += [helper.make_node("Gather", [f"{table}_head", ids], [f"{out}_t"], axis=1),
                      helper.make_node("Transpose", [f"{out}_t"], [out], perm=[*range(1, ranks[ids] + 1), 0])]
        else:
            nodes.append(node)
    _replace_nodes(graph, nodes)


def rewire_gathers(graph: onnx.GraphProto) -> None:
    """Gather(W, ids, axis) -> Cast(Gather(W_quantized, ids, axis)) * Gather(W_scale, ids), where the scales
    are per slice along that axis (the tied Kronecker head's Aᵀ, gathered on axis 1); unused fp32 tables go."""
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" else None
        scale = initializers.get(f"{table}_scale")
        if table not in initializers or f"{table}_quantized" not in initializers or scale is None:
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        shape = list(initializers[table].dims)
        zero = numpy_helper.to_array(initializers[f"{table}_zero_point"])
        if list(scale.dims) != [shape[axis]] or zero.any():
            nodes.append(node)
            continue
        out, ids = node.output[0], node.input[1]
        nodes += [
            helper.make_node("Gather", [f"{table}_quantized", ids], [f"{out}_int8"], axis=axis),
            helper.make_node("Cast", [f"{out}_int8"], [f"{out}_cast"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [f"{table}_scale", ids], [f"{out}_scale"], axis=0),
            helper.make_node("Mul", [f"{out}_cast", f"{out}_scale"], [out]),
        ]
    _replace_nodes(graph, nodes)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` the graph's nodes and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
