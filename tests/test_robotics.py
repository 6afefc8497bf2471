"""Robotics sinks: `run --out x.mcap` writes typed events and annotated frames that read back whole with the
`mcap` reader, every message decoding and validating, on the frames' own timeline."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from focalrt.demo import pan_zoom_frames, write_clip

pytest.importorskip("foxglove")
mcap_reader = pytest.importorskip("mcap.reader")
jsonschema = pytest.importorskip("jsonschema")

FRAMES = 4
FPS = 10.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", pan_zoom_frames(astronaut_bgr, FRAMES), fps=FPS)


def _decode_protobuf(schema, data: bytes):
    """Decode a message with the protobuf schema stored in the MCAP file itself (no generated code)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(schema.data).file:
        pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))
    return cls.FromString(data)


def test_run_writes_an_mcap_that_reads_back_whole(tiny_bundle, clip, tmp_path):
    out_path = tmp_path / "run.mcap"
    out = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(clip),
                          "--regions", "mouth", "--max-new-tokens", "2", "--out", str(out_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    by_topic: dict[str, list] = {}
    with open(out_path, "rb") as f:
        reader = mcap_reader.make_reader(f)
        for schema, channel, message in reader.iter_messages():
            if channel.message_encoding == "json":
                assert schema.encoding == "jsonschema"
                event = json.loads(message.data)
                jsonschema.validate(event, json.loads(schema.data))
                assert message.log_time == round(event["timestamp"] * 1e9)
                by_topic.setdefault(channel.topic, []).append(event)
            else:
                assert (channel.message_encoding, schema.name) == ("protobuf", "foxglove.CompressedImage")
                image = _decode_protobuf(schema, message.data)
                assert image.format == "jpeg" and image.frame_id == "camera"
                assert image.timestamp.seconds * 10**9 + image.timestamp.nanos == message.log_time
                decoded = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
                assert decoded.shape == (360, 480, 3)
                by_topic.setdefault(channel.topic, []).append(message.log_time)
    assert set(by_topic) == {"/focalrt/state", "/focalrt/description", "/focalrt/image"}
    states, descriptions = by_topic["/focalrt/state"], by_topic["/focalrt/description"]
    assert [e["frame"] for e in states] == [e["frame"] for e in descriptions] == list(range(FRAMES))
    assert all(e["type"] == "state" and e["emotion"]["label"] == "happy" for e in states)
    assert all(e["type"] == "description" and isinstance(e["text"], str) for e in descriptions)
    # One timeline: frame i of a 10 fps file is at i/10 s, for the video and both event kinds.
    frame_times = [round(i / FPS * 1e9) for i in range(FRAMES)]
    assert by_topic["/focalrt/image"] == frame_times
    assert [round(e["timestamp"] * 1e9) for e in states] == frame_times


def test_mcap_refuses_to_replace_a_file(tmp_path):
    from focalrt.runtime.stream.robotics import FoxgloveSink

    existing = tmp_path / "x.mcap"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="x.mcap"):
        FoxgloveSink(existing)
    assert existing.read_bytes() == b"keep"


def test_events_of_unknown_type_are_rejected(tmp_path):
    from focalrt.runtime.stream.robotics import FoxgloveSink

    with FoxgloveSink(tmp_path / "y.mcap") as sink, pytest.raises(ValueError, match="type"):
        sink.write({"frame": 0, "timestamp": 0.0})


def test_live_websocket_delivers_a_state_message_to_a_loopback_client():
    """A Foxglove WebSocket client (protocol foxglove.sdk.v1) subscribes to the state topic and receives the
    event as JSON, stamped with its frame time."""
    import struct

    ws_client = pytest.importorskip("websockets.sync.client")
    from focalrt.runtime.stream.robotics import FoxgloveSink

    event = {"type": "state", "frame": 3, "timestamp": 0.3, "face_id": 1, "box": [1, 2, 3, 4],
             "geometry": {"source": "facemesh-geometry"}, "head_pose": {"source": "facemesh-3d-axes"}}
    with FoxgloveSink(port=0) as sink:  # port 0: any free port, on 127.0.0.1
        with ws_client.connect(f"ws://127.0.0.1:{sink.port}", subprotocols=["foxglove.sdk.v1"],
                               open_timeout=10) as ws:
            channels: dict[str, dict] = {}
            while "/focalrt/state" not in channels:
                message = json.loads(ws.recv(timeout=10))
                if message.get("op") == "advertise":
                    channels.update({c["topic"]: c for c in message["channels"]})
            assert {"/focalrt/description", "/focalrt/image"} <= set(channels)
            ws.send(json.dumps({"op": "subscribe",
                                "subscriptions": [{"id": 7, "channelId": channels["/focalrt/state"]["id"]}]}))
            data = None
            for _ in range(50):  # the subscription is asynchronous: publish until the client has it
                sink.write(event)
                try:
                    data = ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                if isinstance(data, bytes):
                    break
            assert isinstance(data, bytes), "no message data received"
            opcode, subscription, log_time = struct.unpack_from("<BIQ", data)
            assert (opcode, subscription, log_time) == (1, 7, 300_000_000)
            assert json.loads(data[13:]) == event
