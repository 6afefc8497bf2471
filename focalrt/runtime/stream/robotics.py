"""Robotics sinks: the typed event stream as MCAP (for Foxglove and ROS 2 tools) and a live Foxglove WebSocket.

Both go through foxglove-sdk (the `[robotics]` extra), which owns the MCAP writer, the WebSocket server and
the well-known message schemas. One topic per event type, JSON-encoded with the JSON schema from
focalrt/schemas; annotated frames on a `foxglove.CompressedImage` topic (JPEG; one topic per source,
/focalrt/image/N, when a run has several). Every message's log time is its frame's timestamp in nanoseconds,
so video and face state share one timeline in Foxglove; a real-time description, which finishes after later
frames, is logged at the frame it was emitted with (`emitted_timestamp`), so the file stays in time order and
its payload's `frame`/`timestamp` say which frame it describes.

Nothing lost: the MCAP file is written through mcap_file.McapFile, and a background thread closes and
flushes the open chunk every `flush_interval_s` (1 s), so after a SIGKILL every message older than that is
readable with the standard `mcap` reader. A failed write (full disk) raises sinks.WriteError saying how many
messages the file keeps, and the file is cut back to its last whole chunk, still readable.
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.stream.sinks import WriteError

TOPICS = {"state": "/focalrt/state", "description": "/focalrt/description"}
IMAGE_TOPIC = "/focalrt/image"
FRAME_ID = "camera"
DEFAULT_PORT = 8765
FLUSH_INTERVAL_S = 1.0  # the most a SIGKILL may cost an MCAP file, in seconds of messages


def event_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of one event type ("state" or "description"), as shipped in focalrt/schemas."""
    return json.loads(resources.files("focalrt.schemas").joinpath(f"{kind}_event.schema.json").read_text())


def log_time_ns(timestamp_s: float) -> int:
    """Frame seconds -> integer nanoseconds, from the 0.1 ms value events carry, so frames and events align."""
    return int(round(round(float(timestamp_s), 4) * 1e9))


def _foxglove():
    try:
        import foxglove
        import foxglove.channels
        import foxglove.mcap
        import foxglove.messages
    except ImportError:
        from focalrt.extras import install_hint

        raise RuntimeError(f"--out *.mcap and --foxglove need foxglove-sdk: {install_hint('robotics')}") from None
    return foxglove


class FoxgloveSink:
    """Events and annotated frames to an MCAP file, a live WebSocket, or both (one foxglove Context)."""

    def __init__(self, mcap_path: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                 overwrite: bool = False, jpeg_quality: int = 85, flush_interval_s: float = FLUSH_INTERVAL_S):
        if mcap_path is None and port is None:
            raise ValueError("FoxgloveSink needs an MCAP path, a WebSocket port, or both")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0 seconds, got {flush_interval_s!r}")
        fg = _foxglove()
        self._fg = fg
        self.context = fg.Context()
        self.mcap_path = Path(mcap_path) if mcap_path is not None else None
        if self.mcap_path is not None and self.mcap_path.exists() and not overwrite:
            raise FileExistsError(f"{self.mcap_path} already exists; remove it or choose another --out")
        self.messages_written = 0  # logged to the MCAP writer
        self.messages_kept = 0  # in whole chunks on disk, readable after a kill
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.Lock()  # one thread at a time in the writer: log, flush, close
        self._failure: WriteError | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.file = self.writer = None
        if self.mcap_path is not None:
            from focalrt.runtime.stream.mcap_file import McapFile

            self.file = McapFile(self.mcap_path)
            # chunks end only when flushed (no size limit), so every chunk is followed by a provisional end
            options = fg.mcap.MCAPWriteOptions(chunk_size=None)
            self.writer = fg.open_mcap(self.file, context=self.context, writer_options=options)
            self._flush()  # the header and a provisional end: a whole (empty) file from the start
            self._flusher = threading.Thread(target=self._flush_every_interval, name="mcap-flush", daemon=True)
            self._flusher.start()
        self.server = None
        if port is not None:
            try:
                self.server = fg.start_server(name="focalrt", host=host, port=int(port), context=self.context)
            except Exception as e:
                self._close_writer()
                raise RuntimeError(f"cannot start the Foxglove WebSocket on {host}:{port}: {e}; "
                                   f"choose another --foxglove PORT") from None
        self.channels = {kind: fg.Channel(topic, schema=event_schema(kind), message_encoding="json",
                                          context=self.context) for kind, topic in TOPICS.items()}
        self.image = fg.channels.CompressedImageChannel(IMAGE_TOPIC, context=self.context)
        self.source_images: dict[int, Any] = {}  # several sources: one image topic each, made on first use
        self.jpeg_quality = int(jpeg_quality)

    @property
    def port(self) -> int | None:
        return self.server.port if self.server is not None else None

    def write(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind not in self.channels:
            raise ValueError(f"event has type {kind!r}; expected one of {sorted(self.channels)}")
        message = json.loads(json.dumps(event, default=_plain))
        with self._lock:
            self._raise_failure()
            self.channels[kind].log(message, log_time=log_time_ns(event.get("emitted_timestamp", event["timestamp"])))
            self.messages_written += self.writer is not None

    def write_frame(self, image_bgr: np.ndarray, timestamp_s: float, source: int | None = None) -> None:
        """One (already annotated) frame as a JPEG foxglove.CompressedImage at the frame's time; a frame of
        source N among several goes to /focalrt/image/N."""
        ok, jpeg = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode the frame as JPEG")
        ns = log_time_ns(timestamp_s)
        msg = self._fg.messages.CompressedImage(
            timestamp=self._fg.messages.Timestamp(sec=ns // 1_000_000_000, nsec=ns % 1_000_000_000),
            frame_id=FRAME_ID, data=jpeg.tobytes(), format="jpeg")
        with self._lock:
            self._raise_failure()
            if source is not None and source not in self.source_images:
                self.source_images[source] = self._fg.channels.CompressedImageChannel(f"{IMAGE_TOPIC}/{source}",
                                                                                       context=self.context)
            (self.image if source is None else self.source_images[source]).log(msg, log_time=ns)
            self.messages_written += self.writer is not None

    def _flush_every_interval(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            with self._lock:
                if self.writer is None or self._failure is not None:
                    return
                try:
                    self._flush()
                except WriteError:
                    return  # kept in self._failure; the next write or close raises it

    def _flush(self) -> None:
        """Close the open chunk and write it out (with the lock held, or before the flusher starts)."""
        written = self.messages_written
        try:
            self.writer.flush()
        except Exception as e:  # FoxgloveError: MCAP error: I/O error ... (full disk, EFBIG, EIO)
            self._fail(e)
        self.messages_kept = written

    def _fail(self, error: BaseException) -> None:
        """A write failed: the writer is unusable; cut the file back to its last whole chunk, keep the error."""
        try:
            self.writer.close()
        except Exception:  # "attempted another write after a write method failed"
            pass
        self.writer = None
        self.file.restore()
        self.file.close(complete=False)
        self._failure = WriteError(
            f"writing {self.mcap_path} failed ({self.file.reason(error)}); it keeps the {self.messages_kept} messages "
            f"of its whole chunks, of {self.messages_written} written (readable with any MCAP reader)")
        raise self._failure

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _close_writer(self) -> None:
        """Finish the MCAP file (summary and footer); WriteError if that fails or a flush had failed."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        with self._lock:
            if self.writer is not None:
                self.file.finishing = True
                try:
                    self.writer.close()
                    self.file.close()
                except Exception as e:
                    self.file.finishing = False
                    self._fail(e)
                self.writer = None
                self.messages_kept = self.messages_written
            self._raise_failure()

    def close(self) -> None:
        """Stop the server and finish the file; raises WriteError (after stopping) if the file could not be
        written whole."""
        try:
            if self.server is not None:
                self.server.stop()
                self.server = None
        finally:
            self._close_writer()

    def __enter__(self) -> FoxgloveSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to an event")
