"""fp16 copies of hexfast's fp32 ONNX graphs, with an exact float32 island.

ONNX Runtime's / onnxconverter-common's float16 converters retype every float
tensor and then wrap each blocked node in its own Cast pair, so a chain of
blocked nodes still round-trips through float16 between them (2^21, the
rounding constant of the exact resize, becomes inf). The preprocessing must
stay float32 end to end, so this converter works by regions instead:

* nodes whose name starts with `keep_prefix` (the `/preprocess/` block, MICA's
  online softmax) and
  the graph inputs form the float32 region; everything else is float16;
* float initializers and Constant values read by the float16 region get
  float16 copies (values beyond ±65504 are clamped, tiny ones flushed as the
  standard converter does); those read by the float32 region stay as they are;
* a Cast(to=float) in the float16 region casts to float16 instead;
* one Cast is inserted wherever a float tensor crosses between the regions,
  and before every float graph output, so the file's inputs and outputs keep
  the fp32 file's types (uint8 / float32) and a runtime feeds the same arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 5.96e-08
CAST_PREFIX = "fp16_boundary/"  # names of the Casts this converter inserts (outside any kept region)


def _to_half(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    a = np.where(np.abs(a) < FP16_TINY, 0.0, a)
    return np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)


def convert_fp16_regions(src: str | os.PathLike, dst: str | os.PathLike, *,
                         keep_prefix: str | tuple[str, ...] = "/preprocess/") -> Path:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    elem: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        elem[vi.name] = vi.type.tensor_type.elem_type
    initializers = {t.name: t for t in graph.initializer}
    for t in graph.initializer:
        elem[t.name] = t.data_type

    def kept(node) -> bool:
        return node.name.startswith(keep_prefix)

    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    elem[node.output[0]] = attr.t.data_type

    fp32_region = {i.name for i in graph.input if elem.get(i.name) == FLOAT}  # float tensors held as float32
    for node in graph.node:
        if kept(node):
            fp32_region.update(o for o in node.output if elem.get(o) == FLOAT)

    new_nodes = []
    casts: dict[tuple[str, int], str] = {}
    half_inits: dict[str, str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__{'fp16' if to == FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{CAST_PREFIX}{out}"))
            casts[key] = out
        return casts[key]

    def half_initializer(name: str) -> str:
        if name not in half_inits:
            tensor = numpy_helper.from_array(_to_half(numpy_helper.to_array(initializers[name])), f"{name}__fp16")
            graph.initializer.append(tensor)
            half_inits[name] = tensor.name
        return half_inits[name]

    for node in graph.node:
        if kept(node):
            for i, name in enumerate(node.input):  # a float16 tensor entering the float32 region
                if name and elem.get(name) == FLOAT and name not in fp32_region and name not in initializers:
                    node.input[i] = cast(name, FLOAT)
            new_nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in fp32_region:
                node.input[i] = cast(name, FLOAT16)
            elif name in initializers and initializers[name].data_type == FLOAT:
                node.input[i] = half_initializer(name)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attr.t)), attr.t.name))
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
        elif node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attr.t)), attr.t.name))
        new_nodes.append(node)

    # Graph outputs computed in the float16 region: rename the producer's output, cast back to float32.
    producers = {o: n for n in new_nodes for o in n.output}
    for output in graph.output:
        if output.type.tensor_type.elem_type != FLOAT or output.name in fp32_region:
            continue
        node = producers[output.name]
        inner = f"{output.name}__fp16_out"
        node.output[list(node.output).index(output.name)] = inner
        for other in new_nodes:
            for i, name in enumerate(other.input):
                if name == output.name:
                    other.input[i] = inner
        new_nodes.append(helper.make_node("Cast", [inner], [output.name], to=FLOAT, name=f"{CAST_PREFIX}{output.name}"))

    # Unused float32 initializers (all readers moved to the float16 copy) are dropped.
    used = {name for n in new_nodes for name in n.input}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.node[:]
    graph.node.extend(_toposort(new_nodes, {i.name for i in graph.input} | {t.name for t in keep_inits}))
    del graph.value_info[:]  # stale types; ONNX Runtime infers them again
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)


def _without_weights(model):
    """A copy for type inference where large float initializers are graph inputs (no data copied)."""
    from onnx import helper

    light = type(model)()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.data_type == FLOAT and len(t.raw_data) > 4096:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return light


def _toposort(nodes, available: set[str]):
    """Nodes in an order where every input is produced before it is read (casts were appended at the end)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"fp16 conversion left a cycle or a dangling input at {rest[0].name}")
        pending = rest
    return ordered
