"""Small TFLite models built without TensorFlow: the flatbuffers schema LiteRT ships, packed
with the `flatbuffers` builder. Each model exercises one behaviour of the LiteRT runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

FILE_IDENTIFIER = b"TFL3"
_TYPES = {
    np.dtype(np.float32): fb.TensorType.FLOAT32,
    np.dtype(np.int32): fb.TensorType.INT32,
    np.dtype(np.int8): fb.TensorType.INT8,
    np.dtype(np.uint8): fb.TensorType.UINT8,
}


@dataclass
class Quant:
    """Per-tensor affine quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass
class _Graph:
    """A model under construction, one subgraph at a time (`subgraph` closes one)."""

    tensors: list[fb.TensorT] = field(default_factory=list)
    buffers: list[fb.BufferT] = field(default_factory=lambda: [fb.BufferT()])
    operators: list[fb.OperatorT] = field(default_factory=list)
    opcodes: list[int] = field(default_factory=list)

    def tensor(
        self,
        name: str,
        dtype: np.dtype[np.generic] | type,
        shape: tuple[int, ...],
        data: np.ndarray | None = None,
        quant: Quant | None = None,
    ) -> int:
        t = fb.TensorT()
        t.name = name
        t.type = _TYPES[np.dtype(dtype)]
        t.shape = [1 if d == -1 else d for d in shape]
        if -1 in shape:
            t.shapeSignature = list(shape)
        t.buffer = 0
        if data is not None:
            buffer = fb.BufferT()
            # As a uint8 array: the flatbuffers builder copies that at once, and bytes one
            # element at a time (seconds for a few MB).
            buffer.data = np.ascontiguousarray(data, dtype=dtype).reshape(-1).view(np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = fb.QuantizationParametersT()
            q.scale = [quant.scale]
            q.zeroPoint = [quant.zero_point]
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options_type: int = 0,
        options: object = None,
    ) -> None:
        if code not in self.opcodes:
            self.opcodes.append(code)
        o = fb.OperatorT()
        o.opcodeIndex = self.opcodes.index(code)
        o.inputs = inputs
        o.outputs = outputs
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    def save(
        self,
        path: Path,
        inputs: list[int],
        outputs: list[int],
        signature: dict[str, dict[str, int]] | None = None,
        custom_code: str | None = None,
    ) -> Path:
        """Pack the model; `signature` maps {"inputs"|"outputs": {name: tensor}}."""
        signatures = [("serving_default", 0, signature)] if signature is not None else []
        return self.pack(path, [self.subgraph(inputs, outputs)], signatures, custom_code)

    def subgraph(self, inputs: list[int], outputs: list[int], name: str = "main") -> fb.SubGraphT:
        """The tensors and operators so far as one subgraph; the next one starts empty
        (buffers and operator codes belong to the model)."""
        sub = fb.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs = self.tensors, inputs, outputs
        sub.operators = self.operators
        sub.name = name
        self.tensors, self.operators = [], []
        return sub

    def pack(
        self,
        path: Path,
        subgraphs: list[fb.SubGraphT],
        signatures: list[tuple[str, int, dict[str, dict[str, int]]]],
        custom_code: str | None = None,
    ) -> Path:
        """Pack `subgraphs`; each signature is (key, subgraph index, its tensor map)."""
        model = fb.ModelT()
        model.version = 3
        model.subgraphs = subgraphs
        model.buffers = self.buffers
        model.description = "edge-agent test model"
        codes = []
        for code in self.opcodes:
            oc = fb.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            codes.append(oc)
        if custom_code is not None:
            codes[0].builtinCode = fb.BuiltinOperator.CUSTOM
            codes[0].deprecatedBuiltinCode = fb.BuiltinOperator.CUSTOM
            codes[0].customCode = custom_code
        model.operatorCodes = codes
        model.signatureDefs = []
        for key, index, tensors in signatures:
            sig = fb.SignatureDefT()
            sig.signatureKey = key
            sig.subgraphIndex = index
            sig.inputs, sig.outputs = [], []
            for kind, target in (("inputs", sig.inputs), ("outputs", sig.outputs)):
                for name, tensor in tensors[kind].items():
                    tm = fb.TensorMapT()
                    tm.name, tm.tensorIndex = name, tensor
                    target.append(tm)
            model.signatureDefs.append(sig)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(builder.Output()))
        return path


def _binary_options(kind: type) -> object:
    options = kind()
    options.fusedActivationFunction = fb.ActivationFunctionType.NONE
    return options


def scale_tflite(path: Path, factor: float = 2.0, width: int = 4, signature: bool = True) -> Path:
    """y = x * factor + 1 on FP32 [-1, width] (Mul then Add), like tests.onnx_models.scale_model.

    With `signature`, the model has a "serving_default" SignatureDef naming its tensors x and
    y; without, the tensor names themselves are x and y.
    """
    g = _Graph()
    x, y = _scale(g, factor, width, "serving_default_" if signature else "")
    sig = {"inputs": {"x": x}, "outputs": {"y": y}} if signature else None
    return g.save(path, [x], [y], sig)


def two_signature_tflite(path: Path, factors: tuple[float, float] = (2.0, 5.0)) -> Path:
    """Two subgraphs, y = x * factor + 1 on FP32 [-1, 4] each: the first is signature
    "other", the second "serving_default", so serving it needs LiteRT's signature runner."""
    g = _Graph()
    subgraphs, signatures = [], []
    for index, (key, factor) in enumerate(zip(("other", "serving_default"), factors, strict=True)):
        x, y = _scale(g, factor, 4, f"{key}_")
        subgraphs.append(g.subgraph([x], [y], key))
        signatures.append((key, index, {"inputs": {"x": x}, "outputs": {"y": y}}))
    return g.pack(path, subgraphs, signatures)


def _scale(g: _Graph, factor: float, width: int, prefix: str) -> tuple[int, int]:
    """Mul by `factor`, then Add 1, on a new FP32 [-1, width] input; (input, output)."""
    x = g.tensor(f"{prefix}x:0" if prefix else "x", np.float32, (-1, width))
    f = g.tensor("factor", np.float32, (1,), np.array([factor], np.float32))
    one = g.tensor("one", np.float32, (1,), np.array([1.0], np.float32))
    scaled = g.tensor("scaled", np.float32, (-1, width))
    y = g.tensor("StatefulPartitionedCall:0" if prefix else "y", np.float32, (-1, width))
    g.op(fb.BuiltinOperator.MUL, [x, f], [scaled], fb.BuiltinOptions.MulOptions,
         _binary_options(fb.MulOptionsT))
    g.op(fb.BuiltinOperator.ADD, [scaled, one], [y], fb.BuiltinOptions.AddOptions,
         _binary_options(fb.AddOptionsT))
    return x, y


def mlp_tflite(path: Path, layers: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """FP32 multilayer perceptron: FullyConnected (weights [out, in], bias [out]) with ReLU
    between layers; input "x" [-1, in], output "y" [-1, out]; a "serving_default" signature.
    """
    g = _Graph()
    width = layers[0][0].shape[1]
    current = g.tensor("serving_default_x:0", np.float32, (-1, width))
    x = current
    for i, (weights, bias) in enumerate(layers):
        last = i == len(layers) - 1
        w = g.tensor(f"w{i}", np.float32, weights.shape, weights)
        b = g.tensor(f"b{i}", np.float32, bias.shape, bias)
        out = g.tensor("StatefulPartitionedCall:0" if last else f"h{i}", np.float32,
                       (-1, weights.shape[0]))
        options = fb.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            fb.ActivationFunctionType.NONE if last else fb.ActivationFunctionType.RELU
        )
        g.op(fb.BuiltinOperator.FULLY_CONNECTED, [current, w, b], [out],
             fb.BuiltinOptions.FullyConnectedOptions, options)
        current = out
    return g.save(path, [x], [current], {"inputs": {"x": x}, "outputs": {"y": current}})


@dataclass(frozen=True)
class QuantizedFc:
    """What int8_fc_tflite built: the real-valued weights and the I/O quantization."""

    weights: np.ndarray
    bias: np.ndarray
    input_quant: Quant
    output_quant: Quant


def int8_fc_tflite(path: Path, width: int = 4, units: int = 3, seed: int = 0) -> QuantizedFc:
    """An int8-quantized FullyConnected: input "x" INT8 [-1, width], output "y" INT8
    [-1, units], per-tensor scales; the real weights and quantization come back to compare.
    """
    rng = np.random.default_rng(seed)
    w_scale = 0.02
    qw = rng.integers(-100, 100, size=(units, width)).astype(np.int8)
    in_q, out_q = Quant(0.05, -3), Quant(0.1, 5)
    qb = rng.integers(-500, 500, size=(units,)).astype(np.int32)
    g = _Graph()
    x = g.tensor("serving_default_x:0", np.int8, (-1, width), quant=in_q)
    w = g.tensor("w", np.int8, (units, width), qw, Quant(w_scale, 0))
    b = g.tensor("b", np.int32, (units,), qb, Quant(in_q.scale * w_scale, 0))
    y = g.tensor("StatefulPartitionedCall:0", np.int8, (-1, units), quant=out_q)
    options = fb.FullyConnectedOptionsT()
    options.fusedActivationFunction = fb.ActivationFunctionType.NONE
    g.op(fb.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [y],
         fb.BuiltinOptions.FullyConnectedOptions, options)
    g.save(path, [x], [y], {"inputs": {"x": x}, "outputs": {"y": y}})
    return QuantizedFc(qw.astype(np.float32) * w_scale, qb.astype(np.float32) * in_q.scale
                       * w_scale, in_q, out_q)


def custom_op_tflite(path: Path, name: str = "EdgeAgentSecret") -> Path:
    """A model whose only operator is a custom one (by default one no runtime has)."""
    g = _Graph()
    x = g.tensor("x", np.float32, (1, 4))
    y = g.tensor("y", np.float32, (1, 4))
    g.op(fb.BuiltinOperator.CUSTOM, [x], [y])
    return g.save(path, [x], [y], custom_code=name)


def constant_input_tflite(path: Path) -> Path:
    """An MLP whose declared model input is its (constant) weight tensor: a well-formed
    flatbuffer on which the LiteRT 2.3.0 interpreter dies of SIGSEGV."""
    g = _Graph()
    x = g.tensor("x", np.float32, (1, 4))
    w = g.tensor("w", np.float32, (2, 4), np.ones((2, 4), np.float32))
    b = g.tensor("b", np.float32, (2,), np.zeros(2, np.float32))
    y = g.tensor("y", np.float32, (1, 2))
    options = fb.FullyConnectedOptionsT()
    g.op(fb.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [y],
         fb.BuiltinOptions.FullyConnectedOptions, options)
    return g.save(path, [w], [y])


def shared_operator_tflite(path: Path, operators: int = 20_000, inputs: int = 1_000) -> Path:
    """A crafted file: one operator table with a long inputs vector, referenced `operators`
    times by its subgraph, so that a naive walk reads operators x inputs entries."""
    b = flatbuffers.Builder(1024)
    b.StartVector(4, inputs, 4)
    for _ in range(inputs):
        b.PrependInt32(-1)
    ins = b.EndVector()
    fb.OperatorStart(b)
    fb.OperatorAddInputs(b, ins)
    op = fb.OperatorEnd(b)
    fb.SubGraphStartOperatorsVector(b, operators)
    for _ in range(operators):
        b.PrependUOffsetTRelative(op)
    ops = b.EndVector()
    fb.SubGraphStart(b)
    fb.SubGraphAddOperators(b, ops)
    sub = fb.SubGraphEnd(b)
    fb.OperatorCodeStart(b)
    fb.OperatorCodeAddBuiltinCode(b, fb.BuiltinOperator.ADD)
    code = fb.OperatorCodeEnd(b)
    fb.ModelStartOperatorCodesVector(b, 1)
    b.PrependUOffsetTRelative(code)
    codes = b.EndVector()
    fb.ModelStartSubgraphsVector(b, 1)
    b.PrependUOffsetTRelative(sub)
    subs = b.EndVector()
    fb.ModelStart(b)
    fb.ModelAddVersion(b, 3)
    fb.ModelAddOperatorCodes(b, codes)
    fb.ModelAddSubgraphs(b, subs)
    b.Finish(fb.ModelEnd(b), file_identifier=FILE_IDENTIFIER)
    path.write_bytes(bytes(b.Output()))
    return path
