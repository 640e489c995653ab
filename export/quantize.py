"""`--int8`, `--int4` and `--int8-dynamic`: onnxruntime weight quantization of the MatMul weights, the tied head
included, with the embedding Gathers reading the quantized tables.

int8 and int4 are block-wise weight-only (MatMulNBits, as llama.cpp's Q8_0/Q4_0 and onnxruntime-genai's builds);
int8-dynamic quantizes the activations per tensor at run time (MatMulInteger): faster on some graphs, but it loses
much more where activations have outliers (SmolLM2-135M, WikiText-2: docs/architecture.md, "Quantization")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # needs the onnx-ir package

BLOCK = 32  # int8/int4: one fp32 scale per 32 consecutive rows (K) of a weight column
ACCURACY_LEVEL = 4  # MatMulNBits multiplies int8-quantized activations (per block) by the 8- or 4-bit weights


def quantize(source: Path, target: Path, variant: str) -> None:
    """Write the fp32 graph `source` with its MatMul weights quantized to `variant` (QUANTIZERS) to `target`; a
    tied dense head is untied first so that it is quantized too."""
    logging.getLogger().setLevel(logging.ERROR)  # both quantizers log pre-processing hints and progress on root
    model = onnx.load(str(source))
    untie_heads(model)
    QUANTIZERS[variant](model, target)


def quantize_dynamic_int8(model: onnx.ModelProto, target: Path) -> None:
    """Dynamic int8, per channel, of every MatMul weight; then the embedding Gathers read the int8 tables (fp32
    copies dropped)."""
    quantize_dynamic(model, target, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    model = onnx.load(str(target))
    rewire_gathers(model.graph)
    onnx.save_model(model, str(target))


def quantize_blocks(model: onnx.ModelProto, target: Path, bits: int) -> None:
    """Block-wise symmetric `bits`-bit weights (MatMulNBits, blocks of BLOCK rows, int8 compute) for the MatMuls
    whose weight has a block of rows or more (`unblocked_matmuls`); smaller ones (Kronecker B factors) stay fp32.
    Symmetric because then a tied table's Gather can read the head's packed bytes as they are
    (share_packed_tables). MatMuls on one activation are merged first (merge_parallel_matmuls)."""
    merge_parallel_matmuls(model.graph)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=unblocked_matmuls(model.graph),
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    share_packed_tables(model.graph, bits)
    onnx.save_model(model, str(target))


QUANTIZERS: dict[str, Callable[[onnx.ModelProto, Path], None]] = {
    "int8": partial(quantize_blocks, bits=8), "int4": partial(quantize_blocks, bits=4),
    "int8-dynamic": quantize_dynamic_int8}


def merge_parallel_matmuls(graph: onnx.GraphProto) -> None:
    """MatMuls that read the same activation with 2-D constant weights (Llama's q/k/v and gate/up projections) -> one
    MatMul on the weights side by side, then a Split into the old outputs: fewer, larger MatMulNBits kernels (int4
    decode 6% faster on SmolLM2-135M; int8 and fp32 unchanged: docs/architecture.md, "Quantization")."""
    weights = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            groups.setdefault(node.input[0], []).append(node)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # a node's output -> what takes the node's place
    for activation, nodes in groups.items():
        if len(nodes) < 2:
            continue
        parts = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        name = f"{nodes[0].name or nodes[0].output[0]}_merged"
        graph.initializer.extend([numpy_helper.from_array(np.concatenate(parts, axis=1), f"{name}_weight"),
                                  numpy_helper.from_array(np.array([w.shape[1] for w in parts], np.int64),
                                                          f"{name}_split")])
        replaced[nodes[0].output[0]] = [
            helper.make_node("MatMul", [activation, f"{name}_weight"], [f"{name}_output"], name=name),
            helper.make_node("Split", [f"{name}_output", f"{name}_split"], [node.output[0] for node in nodes],
                             axis=-1, name=f"{name}_split")]
        replaced.update({node.output[0]: [] for node in nodes[1:]})
    _replace_nodes(graph, [new for node in graph.node for new in replaced.get(node.output[0], [node])])


def unblocked_matmuls(graph: onnx.GraphProto) -> list[str]:
    """MatMuls that the block variants leave fp32: those without a 2-D constant right-hand weight of at least a
    BLOCK of rows (the quantizer pads the last block: a Kronecker B factor of 1–2 rows would become 32; an N-D weight
    would get a Shape-based output reshape)."""
    shapes = {t.name: list(t.dims) for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    return [node.name for node in graph.node if node.op_type == "MatMul"
            and not (len(shapes.get(node.input[1], [])) == 2 and shapes[node.input[1]][0] >= BLOCK)]


def untie_heads(model: onnx.ModelProto) -> None:
    """Gemm(h, E, transB=1) on a table that a Gather also reads -> MatMul(h, Eᵀ): the quantized head then gets its
    own quantized weight instead of staying fp32 (docs/architecture.md, "ONNX graph rules"). Where the ids' rank is
    known, the Gather reads Eᵀ too (axis 1, then a Transpose), so after the Gathers are rewired no fp32 copy of E is
    left."""
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
    """int8-dynamic: Gather(W, ids, axis) -> Cast(Gather(W_quantized, ids, axis)) * Gather(W_scale, ids), where the
    scales are per slice along that axis (the tied Kronecker head's Aᵀ, gathered on axis 1); unused fp32 tables go."""
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


def share_packed_tables(graph: onnx.GraphProto, bits: int) -> None:
    """Gather(W, ids, axis=1) -> Transpose(perm 1..r, 0), with W (K, N) a `bits`-bit MatMulNBits weight (the untied
    dense head's Eᵀ, the tied Kronecker head's A_t) -> GatherBlockQuantized of rows `ids` of the packed
    (N, K/BLOCK, BLOCK·bits/8) table that the head's MatMulNBits reads, then a constant Reshape to (*ids, K): one copy,
    no Transpose, and W's fp32 copy goes. Its block scales get a (N, K/BLOCK, 1) copy (MatMulNBits wants them 2-D)."""
    packed = {node.input[1]: node for node in graph.node if node.op_type == "MatMulNBits"}  # by name: W_Q4 for W
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewired: dict[str, list[onnx.NodeProto]] = {}  # a Gather's output -> what replaces it and its Transpose
    for node in graph.node:
        head = packed.get(f"{node.input[0]}_Q{bits}") if node.op_type == "Gather" else None
        after = consumers.get(node.output[0], [])
        transpose = after[0] if len(after) == 1 and after[0].op_type == "Transpose" else None
        perm = [] if transpose is None else next(list(a.ints) for a in transpose.attribute if a.name == "perm")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if head is None or axis != 1 or perm != [*range(1, len(perm)), 0]:
            continue
        k = next(a.i for a in head.attribute if a.name == "K")
        scales, blocks, shape = head.input[2], f"{head.input[2]}_blocks", f"{node.output[0]}_shape"
        if blocks not in initializers:
            initializers[blocks] = numpy_helper.from_array(
                numpy_helper.to_array(initializers[scales]).reshape(-1, k // BLOCK, 1), blocks)
            graph.initializer.append(initializers[blocks])
        graph.initializer.append(numpy_helper.from_array(np.array([0] * (len(perm) - 1) + [k], np.int64), shape))
        rewired[node.output[0]] = [
            helper.make_node("GatherBlockQuantized", [head.input[1], node.input[1], blocks],
                             [f"{node.output[0]}_blocks"], domain="com.microsoft", gather_axis=0, quantize_axis=2,
                             block_size=BLOCK, bits=bits),
            helper.make_node("Reshape", [f"{node.output[0]}_blocks", shape], list(transpose.output))]
    nodes = [new for node in graph.node if not (node.op_type == "Transpose" and node.input[0] in rewired)
             for new in rewired.get(node.output[0], [node])]
    _replace_nodes(graph, nodes)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` the graph's nodes and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
