"""Schema-constrained descriptions end to end: `run --format json` and `describe --schema` on random-weight
bundles give events whose `state` validates (valid by construction: the llguidance mask), each batched row
follows its own matcher, drafts keep the tokens, bad schemas fail in one line before any frame is read, and a
trained model (SmolLM2) answers a face-state prompt with sensible values."""

from __future__ import annotations

import json
import sys
from importlib import resources

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from focalrt import cli  # noqa: E402
from focalrt.demo import pan_zoom_frames, write_clip  # noqa: E402
from focalrt.runtime.generation.drafts import Drafts  # noqa: E402
from focalrt.runtime.generation.grammar import default_schema  # noqa: E402
from focalrt.runtime.pipeline import Pipeline  # noqa: E402

BLINK = {"type": "object", "properties": {"blink": {"type": "boolean"},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["blink", "count"], "additionalProperties": False}
MAX_TOKENS = "700"  # the face-state object closes within this many tokens even for a random model (<=400 chars)


def _event_schema(name: str) -> dict:
    return json.loads(resources.files("focalrt.schemas").joinpath(name).read_text())


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", pan_zoom_frames(astronaut_bgr, 4))


def _run_events(tiny_bundle, clip, out, *extra):
    code = cli.main(["run", str(tiny_bundle), "--source", str(clip), "--regions", "mouth,eyes", "--box",
                     "10,10,120,90", "--out", str(out), "--max-new-tokens", MAX_TOKENS, "--state-every", "2",
                     "--quiet", *extra])
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_run_format_json_every_description_validates(tiny_bundle, clip, tmp_path):
    events = _run_events(tiny_bundle, clip, tmp_path / "e.jsonl", "--format", "json")
    descriptions = [e for e in events if e["type"] == "description"]
    fresh = [e for e in descriptions if e["fresh"]]
    assert len(fresh) >= 6, "three rows a frame (two regions and a box), several frames"
    event_schema, face_state = _event_schema("description_event.schema.json"), default_schema()
    for e in descriptions:
        jsonschema.validate(e, event_schema)
        assert e["finish_reason"] == "stop", "the grammar closed the object and then allowed only the stop token"
        jsonschema.validate(e["state"], face_state)
        assert json.loads(e["text"]) == e["state"], "the raw text sits beside the parsed object"
    for e in (e for e in events if e["type"] == "state"):  # the fast path's events are untouched
        jsonschema.validate(e, _event_schema("state_event.schema.json"))
        assert "text" not in e


def test_run_drafts_under_a_schema_change_speed_not_events(tiny_bundle, clip, tmp_path):
    """Drafts are verified through the same per-row processors, so the grammar sees accepted tokens only."""
    drafted = _run_events(tiny_bundle, clip, tmp_path / "d.jsonl", "--format", "json", "--draft", "temporal")
    plain = _run_events(tiny_bundle, clip, tmp_path / "p.jsonl", "--format", "json", "--draft", "off")
    texts = [(e["frame"], e["face_id"], e["region"], e["text"]) for e in drafted if e["type"] == "description"]
    assert texts == [(e["frame"], e["face_id"], e["region"], e["text"]) for e in plain if e["type"] == "description"]


def test_batched_rows_each_follow_their_own_matcher(pipe, astronaut_bgr):
    boxes = [(180, 60, 330, 230), (200, 150, 300, 210), (10, 10, 120, 90)]
    batched = pipe.describe_regions(astronaut_bgr, boxes, max_new_tokens=int(MAX_TOKENS), schema=BLINK)
    alone = [pipe.describe(astronaut_bgr, box=b, max_new_tokens=int(MAX_TOKENS), schema=BLINK) for b in boxes]
    for b, a in zip(batched, alone, strict=True):
        jsonschema.validate(b.state, BLINK)
        assert list(b.state) == ["blink", "count"]
        assert b.token_ids == a.token_ids


def test_drafts_verify_with_the_grammar(tiny_bundle, pipe, astronaut_bgr):
    if pipe.model.names.logits_to_keep is None:
        pytest.skip("this bundle's decoder cannot verify drafts")
    drafts, box = Drafts("temporal"), (180, 60, 330, 230)
    plain = pipe.describe(astronaut_bgr, box=box, max_new_tokens=int(MAX_TOKENS), schema="face_state")
    first = pipe.describe(astronaut_bgr, box=box, max_new_tokens=int(MAX_TOKENS), schema="face_state",
                          drafts=drafts, draft_key="k")
    second = pipe.describe(astronaut_bgr, box=box, max_new_tokens=int(MAX_TOKENS), schema="face_state",
                           drafts=drafts, draft_key="k")
    assert plain.token_ids == first.token_ids == second.token_ids
    t = second.timings_ms
    assert t["draft_accepted"] == t["draft_proposed"] > 0, "the last answer drafts the next one, all accepted"
    assert t["decode_calls"] < len(second.token_ids) / 2


def test_describe_schema_file_on_a_random_bundle(tiny_bundle, tmp_path, capsys):
    schema_file = tmp_path / "blink.json"
    schema_file.write_text(json.dumps(BLINK))
    image = str(resources.files("focalrt.data").joinpath("astronaut.jpg"))
    code = cli.main(["describe", str(tiny_bundle), "--image", image, "--box", "150,50,350,250", "--schema",
                     str(schema_file), "--json", "--max-new-tokens", "64"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(out["state"], BLINK)
    assert json.loads(out["text"]) == out["state"] and out["finish_reason"] == "stop"
    capsys.readouterr()
    assert cli.main(["describe", str(tiny_bundle), "--image", image, "--json", "--max-new-tokens", "4"]) == 0
    assert "state" not in json.loads(capsys.readouterr().out), "free text carries no state"


def test_format_json_takes_the_profile_schema(tiny_bundle, tmp_path, astronaut_bgr):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["prompt"]["json_schema"] = BLINK
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    d = Pipeline.from_bundle(bundle).describe(astronaut_bgr, max_new_tokens=64, schema="profile")
    jsonschema.validate(d.state, BLINK)


def test_cut_off_answer_says_so(pipe, astronaut_bgr):
    d = pipe.describe(astronaut_bgr, max_new_tokens=3, schema="face_state")
    assert d.finish_reason == "length" and d.state is None
    assert "max_new_tokens=3" in d.state_error and d.to_json()["state"] is None


@pytest.mark.parametrize("command", ["run", "describe"])
def test_schema_llguidance_cannot_compile_is_one_line_before_any_frame(tiny_bundle, clip, tmp_path, capsys,
                                                                      monkeypatch, command):
    import focalrt.runtime.generation.planning
    import focalrt.runtime.stream.sources

    def no_frames(*_a, **_k):
        raise AssertionError("a frame was read before the schema was checked")

    monkeypatch.setattr(focalrt.runtime.stream.sources, "open_source", no_frames)
    monkeypatch.setattr(focalrt.runtime.generation.planning, "read_image", no_frames)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}))
    out = tmp_path / "e.jsonl"
    args = (["run", str(tiny_bundle), "--source", str(clip), "--regions", "mouth", "--out", str(out)]
            if command == "run" else ["describe", str(tiny_bundle), "--image", str(clip)])
    assert cli.main([*args, "--schema", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and "cannot compile this JSON schema" in err[0] and "unclosed group" in err[0], err
    assert not out.exists(), "nothing half-written"


def test_missing_llguidance_says_how_to_install(tiny_bundle, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    monkeypatch.setitem(sys.modules, "llguidance.numpy", None)
    code = cli.main(["describe", str(tiny_bundle), "--image", "missing.jpg", "--format", "json"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert code == 2 and len(err) == 1 and 'pip install -e ".[grammar]"' in err[0], err


def test_schema_with_format_text_or_server_is_refused(tiny_bundle, capsys):
    assert cli.main(["describe", str(tiny_bundle), "--image", "x.jpg", "--schema", "face_state", "--format",
                     "text"]) == 2
    assert "drop --format text" in capsys.readouterr().err
    assert cli.main(["run", str(tiny_bundle), "--source", "0", "--regions", "mouth", "--format", "json",
                     "--server", "http://127.0.0.1:1"]) == 2
    assert "--server" in capsys.readouterr().err


SMILE = ("A person in a photo is smiling broadly, cheeks raised and teeth showing. They are 30 years old. "
         "Describe their face state as JSON.")


@pytest.mark.slow
def test_smollm2_answers_a_face_state_prompt_sensibly(smollm2):
    """A trained model under the default schema: a smiling description gives emotion happy and AU12 (lip corner
    puller); the JSON always parses, and the values follow the prompt rather than the grammar's first choice."""
    bundle, _, _ = smollm2
    pipe = Pipeline.from_bundle(bundle)
    d = pipe.describe_text(SMILE, max_new_tokens=240, schema="face_state")
    assert d.finish_reason == "stop", d.text
    jsonschema.validate(d.state, default_schema())
    assert d.state["emotion"] == "happy", d.state
    assert {"code": "AU12", "present": True} in d.state["action_units"], d.state
    assert "smil" in d.state["description"].lower()
    free = pipe.describe_text(SMILE, max_new_tokens=8)
    assert free.state is None and "state" not in free.to_json()
