"""The runtime takes tensor names and the hidden size from the manifest, and still loads older bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from focalrt.bundle import file_record  # noqa: E402
from focalrt.runtime.pipeline import Pipeline  # noqa: E402

BOX = (170, 80, 280, 200)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rename(graph, old: str, new: str) -> None:
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _rewrite(bundle: Path, component: str, renames: dict[str, str], edit=None) -> None:
    """Rename tensors in one component's graph (optionally edit it further) and record it in the manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rec = manifest["components"][component]
    model = onnx.load(str(bundle / rec["file"]))
    for old, new in renames.items():
        _rename(model.graph, old, new)
    if edit is not None:
        edit(model, rec)
    onnx.save_model(model, str(bundle / rec["file"]))
    for side in ("inputs", "outputs"):
        for value in rec[side]:
            value["name"] = renames.get(value["name"], value["name"])
    rec.update(file_record(bundle, rec["file"]))
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _split_embedding(bundle: Path) -> None:
    """Turn a bundle into the layout exported before the decoder embedded its tokens: embed.onnx (token ids,
    image embeddings -> inputs_embeds) and a decoder taking inputs_embeds, cut out of today's decoder."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rec = manifest["components"]["decoder"]
    model = onnx.load(str(bundle / rec["file"]))
    graph = model.graph
    embed_nodes = [n for n in graph.node if n.name.startswith("/embed/")]
    made = {o for n in embed_nodes for o in n.output}
    out = next(o for n in graph.node if n not in embed_nodes for o in n.input if o in made)
    token_inputs = [i.name for i in graph.input if i.name in ("input_ids", "image_embeds")]
    graph.value_info.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    embed = onnx.utils.Extractor(model).extract_model(token_inputs, [out])
    _rename(embed.graph, out, "inputs_embeds")
    onnx.save_model(embed, str(bundle / "embed.onnx"))
    for n in embed_nodes:
        graph.node.remove(n)
    _rename(graph, out, "inputs_embeds")
    hidden = manifest["text"]["hidden_size"]
    first = onnx.helper.make_tensor_value_info("inputs_embeds", onnx.TensorProto.FLOAT, ["batch", "sequence", hidden])
    kept = [first] + [i for i in graph.input if i.name not in token_inputs]
    del graph.input[:]
    graph.input.extend(kept)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    onnx.save_model(model, str(bundle / rec["file"]))
    rec["inputs"] = [{"name": "inputs_embeds"}] + [i for i in rec["inputs"] if i["name"] not in token_inputs]
    rec.update(file_record(bundle, rec["file"]))
    manifest["components"]["embed"] = {**file_record(bundle, "embed.onnx"),
                                       "inputs": [{"name": n} for n in token_inputs],
                                       "outputs": [{"name": "inputs_embeds"}]}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def reference(tiny_bundle, astronaut_bgr):
    pipe = Pipeline.from_bundle(tiny_bundle)
    return pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=10).token_ids, \
        pipe.describe_regions(astronaut_bgr, [BOX, (190, 120, 260, 170)], max_new_tokens=6)


def test_renamed_tensors_are_read_from_the_manifest(tiny_bundle, tmp_path, astronaut_bgr, reference):
    bundle = _copy(tiny_bundle, tmp_path / "renamed")
    _rewrite(bundle, "vision", {"image_embeds": "vision_out"})
    layers = json.loads((bundle / "manifest.json").read_text())["text"]["num_layers"]
    kv = {f"past_key_values.{i}.{k}": f"cache_in_{i}_{k}" for i in range(layers) for k in ("key", "value")}
    kv.update({f"present.{i}.{k}": f"cache_out_{i}_{k}" for i in range(layers) for k in ("key", "value")})
    _rewrite(bundle, "decoder", {"input_ids": "ids", "image_embeds": "pictures", "attention_mask": "mask",
                                 "position_ids": "pos", "logits_to_keep": "keep", "logits": "scores", **kv})
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.model.names.logits == "scores" and pipe.model.names.past[0] == "cache_in_0_key"
    assert pipe.model.names.token_ids == "ids" and pipe.model.names.image_embeds == "pictures"
    tokens, regions = reference
    assert pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=10).token_ids == tokens
    got = pipe.describe_regions(astronaut_bgr, [BOX, (190, 120, 260, 170)], max_new_tokens=6)
    assert [d.token_ids for d in got] == [d.token_ids for d in regions]


def test_a_bundle_with_an_embedding_component_still_loads(tiny_bundle, tmp_path, astronaut_bgr, reference):
    """Bundles exported before the decoder embedded its tokens: embed.onnx, renamed too, then the decoder."""
    bundle = _copy(tiny_bundle, tmp_path / "two-step")
    _split_embedding(bundle)
    _rewrite(bundle, "embed", {"input_ids": "ids", "image_embeds": "pictures", "inputs_embeds": "embedded"})
    _rewrite(bundle, "decoder", {"inputs_embeds": "x", "attention_mask": "mask", "position_ids": "pos",
                                 "logits_to_keep": "keep", "logits": "scores"})
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.model.embed is not None and pipe.model.names.inputs_embeds == "x"
    assert pipe.model.names.token_ids == "ids" and pipe.model.names.token_embeds == "embedded"
    tokens, regions = reference
    assert pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=10).token_ids == tokens
    got = pipe.describe_regions(astronaut_bgr, [BOX, (190, 120, 260, 170)], max_new_tokens=6)
    assert [d.token_ids for d in got] == [d.token_ids for d in regions]


def test_hidden_size_comes_from_the_manifest(tiny_bundle, tmp_path):
    pipe = Pipeline.from_bundle(tiny_bundle)
    assert pipe.model.hidden_size == pipe.bundle.manifest["text"]["hidden_size"]
    assert pipe.model.no_image().shape() == [1, pipe.model.hidden_size]  # the image row of a call without one
    bundle = _copy(tiny_bundle, tmp_path / "two-step")
    _split_embedding(bundle)
    pipe = Pipeline.from_bundle(bundle)
    ids = np.array([[100, 101, 102]])
    assert pipe.model.embed_tokens(ids).numpy().shape == (1, 3, pipe.model.hidden_size)


def test_a_bundle_from_before_k_token_verification_still_loads(tiny_bundle, tmp_path, astronaut_bgr, reference):
    """A decoder without the `logits_to_keep` input (last-token logits only), as bundles had it before."""
    bundle = _copy(tiny_bundle, tmp_path / "old")
    _split_embedding(bundle)

    def drop_keep_input(model, rec):
        graph = model.graph
        keep = next(i for i in graph.input if i.name == "logits_to_keep")
        graph.input.remove(keep)
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "logits_to_keep"))
        rec["inputs"] = [i for i in rec["inputs"] if i["name"] != "logits_to_keep"]
        rec["logits"] = "last_token"

    _rewrite(bundle, "decoder", {}, drop_keep_input)
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.model.names.logits_to_keep is None
    tokens, regions = reference
    assert pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=10).token_ids == tokens
    got = pipe.describe_regions(astronaut_bgr, [BOX, (190, 120, 260, 170)], max_new_tokens=6)
    assert [d.token_ids for d in got] == [d.token_ids for d in regions]


def test_a_manifest_without_component_records_uses_the_graphs_own_names(tiny_bundle, tmp_path, astronaut_bgr,
                                                                         reference):
    bundle = _copy(tiny_bundle, tmp_path / "bare")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rec in manifest["components"].values():
        rec.pop("inputs"), rec.pop("outputs")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.model.names.logits_to_keep == "logits_to_keep"
    assert pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=10).token_ids == reference[0]


def test_a_decoder_record_that_does_not_fit_the_layers_is_a_bundle_error():
    from focalrt.bundle import BundleError
    from focalrt.runtime.generation.generate import TensorNames

    record = {"inputs": [{"name": n} for n in ("x", "mask", "pos", "k0", "v0")], "outputs": [{"name": "logits"}]}
    with pytest.raises(BundleError, match="2-layer decoder has 8 or 9 inputs"):
        TensorNames.from_manifest({"decoder": record}, 2)
    with pytest.raises(BundleError, match="2-layer decoder has 7 or 8 inputs"):  # with an embedding component
        TensorNames.from_manifest({"decoder": record, "embed": {}}, 2)
