"""Build all-MiniLM-L6-v2 as an ONNX graph from its safetensors weights, without torch.

The graph has the interface of the ``model.onnx`` Chroma downloads (inputs
``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [batch, seq];
output 0 ``last_hidden_state`` float32 [batch, seq, 384]), so Chroma's own
``DefaultEmbeddingFunction`` -- and therefore MemPalace -- can use it too.

The BERT encoder is written out op by op at opset 17: embeddings (word +
position + token type) and LayerNorm, then per layer multi-head self-attention
with the additive mask, residual + LayerNorm, an erf-GELU feed-forward block and
residual + LayerNorm. Position ids are a slice of a constant ``[1, 512]`` buffer
(a ``Range`` there trips onnxruntime's graph optimiser).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        w = self.const(f"{name}.weight_t", weight.T.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], name: str, eps: float) -> str:
        g = self.const(f"{name}.weight", weights[f"{name}.weight"])
        b = self.const(f"{name}.bias", weights[f"{name}.bias"])
        return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=eps)


def build_model(weights: dict[str, np.ndarray], config: dict) -> onnx.ModelProto:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    max_pos = int(config["max_position_embeddings"])
    head_dim = hidden // heads
    w = {k.removeprefix("bert."): v for k, v in weights.items()}
    g = _Graph()

    # Embeddings
    word = g.op("Gather", [g.const("word_embeddings", w["embeddings.word_embeddings.weight"]), "input_ids"])
    seq_len = g.op("Slice", [g.op("Shape", ["input_ids"]), g.const("one", np.array([1], np.int64)),
                             g.const("two", np.array([2], np.int64))])
    zero = g.const("zero", np.array([0], np.int64))
    pos_ids = g.op("Slice", [g.const("position_ids", np.arange(max_pos, dtype=np.int64)[None, :]),
                             zero, seq_len, g.const("axis1", np.array([1], np.int64))])
    pos = g.op("Gather", [g.const("position_embeddings", w["embeddings.position_embeddings.weight"]), pos_ids])
    tt = g.op("Gather", [g.const("token_type_embeddings", w["embeddings.token_type_embeddings.weight"]),
                         "token_type_ids"])
    x = g.layer_norm(g.op("Add", [g.op("Add", [word, pos]), tt]), w, "embeddings.LayerNorm", eps)

    # Additive attention mask [batch, 1, 1, seq]: 0 where attended, float32 min where padded
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const("axes12", np.array([1, 2], np.int64))])
    inv = g.op("Sub", [g.const("f_one", np.array(1.0, np.float32)), mask])
    ext_mask = g.op("Mul", [inv, g.const("f_min", np.array(np.finfo(np.float32).min, np.float32))])

    split_shape = g.const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = g.const("merge_heads", np.array([0, 0, hidden], np.int64))
    scale = g.const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    sqrt2 = g.const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    f_one = "f_one"

    for i in range(layers):
        p = f"encoder.layer.{i}"

        def lin(inp: str, name: str) -> str:
            return g.linear(inp, w[f"{name}.weight"], w[f"{name}.bias"], name)

        def heads_of(inp: str, perm: list[int]) -> str:
            return g.op("Transpose", [g.op("Reshape", [inp, split_shape])], perm=perm)

        q = heads_of(lin(x, f"{p}.attention.self.query"), [0, 2, 1, 3])
        k = heads_of(lin(x, f"{p}.attention.self.key"), [0, 2, 3, 1])
        v = heads_of(lin(x, f"{p}.attention.self.value"), [0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), ext_mask])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        attn = lin(ctx, f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [attn, x]), w, f"{p}.attention.output.LayerNorm", eps)

        inter = lin(x, f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Div", [inter, sqrt2])])
        gelu = g.op("Mul", [g.op("Mul", [inter, half]), g.op("Add", [erf, f_one])])
        out = lin(gelu, f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [out, x]), w, f"{p}.output.LayerNorm", eps)

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", ints, [out], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="palace-etl")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def convert(model_dir: Path, out_path: Path) -> None:
    """Write ``model.onnx`` built from ``model_dir/model.safetensors`` + ``config.json``."""
    import json

    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    model = build_model(load_file(str(model_dir / "model.safetensors")), config)
    onnx.save_model(model, str(out_path))
