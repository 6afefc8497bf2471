"""GGUF weights kept on their own grid (`focalrt export --keep-quantization`, focalrt/export/gguf_grid.py).

The fast tests write a small GGUF file with the `gguf` package's own writer and quantizer (Q4_0, Q4_1, Q8_0
and a float tensor), build an ONNX graph whose MatMul weights are that file's dequantized rows (alone,
permuted, and concatenated as a fused projection would be), rewrite it, and run it in ONNX Runtime: the
MatMulNBits form must give the dequantized product. ONNX Runtime unpacks the bits itself, so a wrong
nibble order, zero point or offset fails these tests. The slow ones export SmolLM2 with the flag.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")

from focalrt.export import gguf_grid  # noqa: E402

K = 96  # three blocks of 32


def write_gguf(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A GGUF file holding each float array quantized to the named type by the gguf package."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(str(path), "llama")
    for name, (kind, values) in tensors.items():
        qtype = GGMLQuantizationType[kind]
        data = values if kind == "F32" else quants.quantize(values, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    rng = np.random.default_rng(7)
    # Q4_1 rows with a clear per-block minimum (not centred on 0), as trained weights often are
    q41 = (rng.standard_normal((40, K)) * 0.05 + rng.uniform(-0.2, 0.3, (40, 1))).astype(np.float32)
    tensors = {"blk.0.attn_q.weight": ("Q4_0", rng.standard_normal((48, K)).astype(np.float32) * 0.1),
               "blk.0.ffn_up.weight": ("Q4_1", q41),
               "token_embd.weight": ("Q8_0", rng.standard_normal((24, K)).astype(np.float32) * 0.3),
               "blk.0.attn_norm.weight": ("F32", rng.standard_normal((8, K)).astype(np.float32))}
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, tensors)
    return path


def dequantized(path) -> dict[str, np.ndarray]:
    """Each tensor as the gguf package dequantizes it (what transformers hands the exporter), [rows, K]."""
    from gguf import GGUFReader, quants

    return {t.name: quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, K)
            for t in GGUFReader(str(path)).tensors}


def graph_of(weights: dict[str, np.ndarray], path) -> None:
    """y_name = x @ W_name for each [K, N] weight; one input x [B, S, K]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for name, w in weights.items():
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", ["x", f"{name}.weight"], [name], name=f"/{name}/MatMul"))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", w.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save_model(model, str(path))


def run(path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True))


@pytest.fixture(scope="module")
def rewritten(small_gguf, tmp_path_factory):
    """The fp32 graph of every layout a decoder may hold, and its rewrite at accuracy levels 0 and 4."""
    rows = dequantized(small_gguf)
    q, up, emb = rows["blk.0.attn_q.weight"], rows["blk.0.ffn_up.weight"], rows["token_embd.weight"]
    perm = np.random.default_rng(1).permutation(q.shape[0])  # transformers un-permutes q/k heads by rows
    weights = {"q": q.T, "up": up.T, "lm_head": emb.T, "q_permuted": q[perm].T,
               "fused_q_up": np.concatenate([q, up]).T,  # both 4-bit: one 4-bit node with offsets on the up part
               "fused_up_emb": np.concatenate([up, emb]).T,  # 4- and 8-bit rows: one 8-bit node
               "not_from_gguf": np.random.default_rng(2).standard_normal((K, 16)).astype(np.float32)}
    out = tmp_path_factory.mktemp("grid")
    graph_of(weights, out / "fp32.onnx")
    grid = gguf_grid.read_grid(small_gguf)
    summary = gguf_grid.keep_quantization(out / "fp32.onnx", out / "level4.onnx", grid)
    gguf_grid.with_accuracy_level(out / "level4.onnx", out / "level0.onnx", 0)
    return weights, out, summary


def test_rewritten_matmuls_give_the_dequantized_product_exactly_in_fp32(rewritten):
    weights, out, _ = rewritten
    x = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32)
    got = run(out / "level0.onnx", x)
    for name, w in weights.items():
        ref = x.astype(np.float64) @ w.astype(np.float64)
        err = np.abs(got[name] - ref).max()
        assert err <= 1e-5 * max(1.0, np.abs(ref).max()), (name, err)


def test_with_int8_activations_the_product_is_within_their_rounding(rewritten):
    weights, out, _ = rewritten
    x = np.random.default_rng(4).standard_normal((1, 3, K)).astype(np.float32)
    got = run(out / "level4.onnx", x)
    for name, w in weights.items():
        ref = x.astype(np.float64) @ w.astype(np.float64)
        # int8 activations per block of 32: each x off by at most max|x_block|/254
        bound = np.abs(x).max() / 254 * np.abs(w).sum(0).max() * 1.01
        assert np.abs(got[name] - ref).max() <= bound, name
        # a wrong bit layout is off by the size of the product, far beyond this
        assert np.corrcoef(got[name].ravel(), ref.ravel())[0, 1] > 0.9999, name


def test_the_graph_says_what_it_kept(rewritten):
    _, out, summary = rewritten
    model = onnx.load(str(out / "level4.onnx"))
    nbits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert {a["bits"] for a in nbits.values()} == {4, 8}
    assert nbits["/lm_head/MatMul.gguf"]["bits"] == 8 and nbits["/fused_up_emb/MatMul.gguf"]["bits"] == 8
    assert nbits["/q/MatMul.gguf"]["bits"] == 4 and nbits["/fused_q_up/MatMul.gguf"]["bits"] == 4
    assert all(a["accuracy_level"] == 4 and a["block_size"] == 32 for a in nbits.values())
    assert summary["nodes_4bit"] == 4 and summary["nodes_8bit"] == 2 and summary["float_matmuls"] == 1
    # Q4_1 weights carry the offset term; Q4_0 and Q8_0 alone do not
    assert summary["nodes_with_offsets"] == 3
    assert [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.name == "/not_from_gguf/MatMul"]
    assert not any(i.name == "q.weight" for i in model.graph.initializer)  # the fp32 copy is gone


def test_each_block_layout_round_trips_through_the_grid(small_gguf):
    grid = gguf_grid.read_grid(small_gguf)
    index = gguf_grid.row_index(grid)
    for name, g in grid.items():
        packed = gguf_grid.match_weight(g.dequantized.T, grid, index)
        np.testing.assert_allclose(gguf_grid.dequantize_packed(packed), g.dequantized.T, rtol=0, atol=1e-6,
                                   err_msg=name)
        assert packed.bits == (8 if g.kind == "Q8_0" else 4)


def test_a_weight_partly_made_of_other_values_is_refused(small_gguf):
    grid = gguf_grid.read_grid(small_gguf)
    q = grid["blk.0.attn_q.weight"].dequantized
    mixed = np.concatenate([q, q[:2] + 1.0]).T
    with pytest.raises(ValueError, match="2 of 50 columns"):
        gguf_grid.match_weight(mixed, grid, gguf_grid.row_index(grid))


def test_an_unsupported_type_is_refused_in_one_line_naming_the_kept_ones(tmp_path):

    rng = np.random.default_rng(0)
    path = tmp_path / "q5.gguf"
    write_gguf(path, {"blk.0.ffn_up.weight": ("Q5_0", rng.standard_normal((8, K)).astype(np.float32)),
                      "blk.0.attn_q.weight": ("Q4_1", rng.standard_normal((8, K)).astype(np.float32))})
    with pytest.raises(gguf_grid.UnsupportedGGUFType) as e:
        gguf_grid.check_types(path)
    message = str(e.value)
    assert "\n" not in message and "Q5_0" in message and "blk.0.ffn_up.weight" in message
    assert "Q4_0, Q4_1, Q8_0" in message and "without --keep-quantization" in message


def test_the_cli_refuses_an_unsupported_gguf_before_loading_it(tmp_path, capsys):
    pytest.importorskip("torch")
    from focalrt.cli import main

    path = tmp_path / "q5.gguf"
    write_gguf(path, {"blk.0.ffn_up.weight": ("Q5_0", np.ones((8, K), np.float32))})
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(path), "--keep-quantization", "--out", str(out), "--quiet",
                 "--no-face-heads"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q5_0" in err[0] and "Q4_0, Q4_1, Q8_0" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_the_cli_refuses_the_flag_for_a_checkpoint_directory(tmp_path, capsys):
    pytest.importorskip("torch")
    from focalrt.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert main(["export", "--model", str(ckpt), "--keep-quantization", "--out", str(tmp_path / "b"),
                 "--quiet", "--no-face-heads"]) == 2
    assert "not a .gguf file" in capsys.readouterr().err


# ---------------------------------------------------------------- SmolLM2-135M (Q4_1 + a Q8_0 embedding), slow


@pytest.fixture(scope="module")
def kept(smollm2, tmp_path_factory):
    """The user's path: `focalrt export --preset smollm2-135m --keep-quantization` (validated at export)."""
    from focalrt.cli import main

    out = tmp_path_factory.mktemp("smollm2-kept") / "bundle"
    assert main(["export", "--preset", "smollm2-135m", "--keep-quantization", "--out", str(out), "--quiet"]) == 0
    return out


def weight_bytes(bundle) -> int:
    return sum(f.stat().st_size for f in bundle.iterdir() if f.name.startswith("decoder.onnx"))


@pytest.mark.slow
def test_the_bundle_keeps_every_gguf_matmul_on_its_grid(kept, smollm2):
    m = json.loads((kept / "manifest.json").read_text())
    dec = m["components"]["decoder"]
    q = dec["quantization"]
    # 30 layers x 5 projections of Q4_1 (q/k/v fused into one), and the tied LM head from the Q8_0 token
    # embedding, whose blocks the token lookup reads too (the table is stored once, on its grid)
    assert (q["nodes_4bit"], q["nodes_8bit"], q["float_matmuls"]) == (150, 1, 0)
    assert q["tied_gathers"] == 1
    assert q["columns"]["Q8_0"] == m["text"]["vocab_size"] and q["accuracy_level"] == 4
    assert dec["precision"] == "int4" and dec["validation_max_abs_diff_fp32_compute"] < 1e-3
    assert weight_bytes(kept) < weight_bytes(smollm2[0]) / 3


@pytest.fixture(scope="module")
def pipes(kept, smollm2):
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(smollm2[0], provider="cpu"), Pipeline.from_bundle(kept, provider="cpu")


@pytest.mark.slow
def test_perplexity_is_within_one_percent_of_the_dequantized_fp32_bundle(pipes):
    from pydoc_data.topics import topics

    from focalrt.runtime.generation.perplexity import measure, text_tokens

    fp32, grid = pipes
    ids, _ = text_tokens(fp32, "\n\n".join(topics[k] for k in sorted(topics)))  # the precision table's text
    ref = measure(fp32, ids, 512, None, 4)["perplexity"]
    got = measure(grid, ids, 512, None, 4)["perplexity"]
    assert got <= ref * 1.01, (got, ref)


@pytest.mark.slow
def test_teacher_forced_tokens_agree_with_the_fp32_bundle(pipes):
    """The fp32 bundle's greedy answers fed back: the grid bundle picks the same next token almost everywhere
    (int8 activations move near-ties only). Free-running greedy text is not compared: one flipped near-tie
    changes the rest (on "What is the capital of France?" the first token is 'The' 25.33 against 'L' 25.24 in
    fp32, and the grid bundle starts with 'L')."""
    from focalrt.runtime.generation.generate import PromptCache

    fp32, grid = pipes
    agree = []
    for prompt in ("Explain step by step how photosynthesis works.", "Give me a detailed recipe for pancakes."):
        d = fp32.describe_text(prompt, max_new_tokens=48, return_logits=True)
        ref = [int(np.argmax(lg)) for lg in d.logits]
        ids = np.array(d.prompt_token_ids + ref[:-1], np.int64)
        t = grid.text_cfg
        cache = PromptCache.allocate(t["num_layers"], 1, t["num_kv_heads"], t["head_dim"], ids.size, "cpu")
        logits = grid.model.forward(ids[None], np.arange(ids.size)[None], cache, ids.size, keep=len(ref))[0]
        agree += [int(np.argmax(logits[i])) == ref[i] for i in range(len(ref))]
    assert np.mean(agree) >= 0.9, np.mean(agree)
