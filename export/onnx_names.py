"""ONNX graph nodes named back to the PyTorch modules that produced them (the exporter's scope names)."""

from __future__ import annotations

from pathlib import Path

ELEMENTWISE = {"Relu", "Clip", "Add", "Mul", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization", "Div",
               "Sub", "LeakyRelu", "Gelu", "Erf", "Tanh", "Identity", "Cast"}
COMPUTE = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def _module_of(scope: str, modules: set[str]) -> str | None:
    """The module a node's scope path names. The exporter writes each level as the child's name, qualified by
    its parent when the parent is a container: "/layer2/layer2.0/downsample/downsample.0/Conv" is the module
    "layer2.0.downsample.0"."""
    comps = [c for c in scope.strip("/").split("/")[:-1] if c]
    path: list[str] = []
    for c in comps:
        if path and c.startswith(path[-1] + "."):
            path[-1] = c
        else:
            path.append(c)
    if ".".join(path) in modules:
        return ".".join(path)
    for i in range(len(comps)):
        name = ".".join(comps[i:])
        if name in modules:
            return name
    return None


def node_owners(onnx_path: Path, modules: set[str]) -> dict[str, str]:
    """Tensor or node name of the exported graph -> the conv/linear module that computes it."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    owners: dict[str, str] = {}

    def owner(node, depth: int = 0) -> str | None:
        if node.op_type in COMPUTE:
            return _module_of(node.name, modules)
        if node.op_type in ELEMENTWISE and depth < 6:
            for inp in node.input:  # a fused op belongs to the compute op that feeds it
                if inp in producer and (found := owner(producer[inp], depth + 1)):
                    return found
        return None

    for node in graph.node:
        found = owner(node)
        if found:
            owners[node.name] = found
            for out in node.output:
                owners[out] = found
    return owners
