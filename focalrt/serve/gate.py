"""The request gate: a loopback HTTP front that checks every KServe v2 request before Triton parses it.

Why: Triton (the build PyTriton 0.7 ships) allocates what an HTTP/JSON request *declares* before it reads the
data. `"shape": [1, 1000000000, 4]` with four numbers in `data` makes it allocate 32 GB and abort
(std::bad_alloc, signal 6): one small request would take the server down for every camera. Triton has no
request-size or shape limit to set, so `focalrt serve` puts this gate on the public HTTP port and runs Triton's
HTTP endpoint on a private loopback port behind it.

For an inference request the gate reads the JSON header only (never the image bytes), and refuses with a 4xx
that names the input:
- a body over `max_request_bytes` (413), a compressed body (415), or a body shorter than Content-Length;
- a header that is not UTF-8 JSON, or inputs without a name, a known datatype or a shape of non-negative ints;
- a declared size (elements x datatype size) over `max_request_bytes`;
- a shape that disagrees with the body: the count of `data` values, or `binary_data_size` against the shape
  and against the bytes actually sent;
- shared-memory inputs (the gate cannot see their size).
Server control (model loading, shared-memory registration, logging and trace settings) is closed (403).
Everything else (health, metadata, statistics, good requests) is forwarded unchanged, and Triton's own answer
comes back. Standard library only.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_DIMS = 8
CLIENT_TIMEOUT_S = 60.0  # a client that stops sending mid-request loses its connection, not a server thread
DATATYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                  "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}  # BYTES: length prefix
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$")
# Server control that no camera needs and a stranger must not have: loading models, mapping shared memory,
# changing logging or tracing. PyTriton itself talks to Triton's private port, not through the gate.
CLOSED_PREFIXES = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/logging", "/v2/trace")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class GateError(ValueError):
    """A request the gate refuses: HTTP status and a message naming the input and the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _leaves(data: Any, limit: int) -> int:
    """How many values a nested JSON `data` list holds (counting stops past `limit`)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def check_infer_request(header_bytes: bytes, binary_bytes: int, max_request_bytes: int) -> None:
    """Refuse (GateError 400/413) an inference request whose JSON header declares more than it carries or
    more than the limit. `binary_bytes` is how many bytes follow the JSON header (the binary extension)."""
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise GateError(400, f"the request header is not UTF-8 (byte {e.start}); send JSON text") from None
    except ValueError as e:
        raise GateError(400, f"the request header is not valid JSON ({e})") from None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise GateError(400, "the request has no 'inputs' list; see the KServe v2 inference protocol")
    declared_total, binary_total = 0, 0
    for k, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise GateError(400, f"input {k} has no 'name' string")
        name = tensor["name"]
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if datatype not in DATATYPE_BYTES:
            raise GateError(400, f"input {name!r} has datatype {datatype!r}; use one of {', '.join(DATATYPE_BYTES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise GateError(400, f"input {name!r} has shape {str(shape)[:80]}; a shape is a list of at most "
                                 f"{MAX_DIMS} non-negative integers")
        elements = math.prod(shape)
        declared = elements * DATATYPE_BYTES[datatype]
        declared_total += declared
        if declared_total > max_request_bytes:
            raise GateError(413, f"input {name!r} declares shape {shape} of {datatype} ({declared} bytes); the server "
                                 f"accepts at most {max_request_bytes} bytes a request (focalrt serve "
                                 f"--max-request-bytes)")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise GateError(400, f"input {name!r}: 'parameters' must be an object")
        if any(key.startswith("shared_memory") for key in parameters):
            raise GateError(400, f"input {name!r} uses shared memory, which this server does not accept; send the "
                                 f"data in the request")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise GateError(400, f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
            if datatype != "BYTES" and size != declared:
                raise GateError(400, f"input {name!r}: shape {shape} of {datatype} needs {declared} bytes, but "
                                     f"binary_data_size is {size}")
            if datatype == "BYTES" and size < declared:  # each element has a 4-byte length in front
                raise GateError(400, f"input {name!r}: {elements} BYTES elements need at least {declared} bytes, "
                                     f"but binary_data_size is {size}")
            binary_total += size
        elif "data" in tensor:
            held = _leaves(tensor["data"], elements)
            if held != elements:
                more = "more than " if held > elements else ""
                raise GateError(400, f"input {name!r} declares shape {shape} ({elements} values), but its data holds "
                                     f"{more}{held}")
        else:
            raise GateError(400, f"input {name!r} has neither 'data' nor binary_data_size")
    if binary_total != binary_bytes:
        raise GateError(400, f"the inputs declare {binary_total} bytes of binary data, but {binary_bytes} follow the "
                             f"JSON header (a truncated or padded body)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient expects
    server: GateServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("gate: " + format, *args)

    def _refuse(self, status: int, message: str, close: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes | None:
        """The body, or None after refusing it (too big, chunked, cut short)."""
        if self.headers.get("Transfer-Encoding", "identity").lower() != "identity":
            self._refuse(411, "send the request with a Content-Length (chunked bodies are not accepted)", close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._refuse(400, f"Content-Length {self.headers.get('Content-Length')!r} is not a number", close=True)
            return None
        if length < 0 or length > self.server.max_request_bytes + 1024 * 1024:  # the JSON header on top
            self._refuse(413, f"the request has {length} bytes; the server accepts at most "
                              f"{self.server.max_request_bytes} (focalrt serve --max-request-bytes)", close=True)
            return None
        body = self.rfile.read(length)
        if len(body) != length:  # the client went away mid-body: nobody to answer
            self.close_connection = True
            return None
        return body

    def _forward(self, body: bytes | None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in range(2):  # a kept-alive connection Triton closed meanwhile: once more on a new one
            conn = self.server.triton_connection()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                self.server.drop_connection()
                if attempt:
                    # the client's connection stays open (keep-alive): a camera waiting for the server polls on it
                    self._refuse(503, "the inference server behind the gate is not answering yet; retry shortly")
                    return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(CLOSED_PREFIXES) or re.match(r"^/v2/models/[^/]+(/versions/[^/]+)?/trace", path):
            self._refuse(403, f"{path} is not available through focalrt serve (server control is closed)")
            if self.command in ("POST", "PUT"):
                self.close_connection = True  # its body was not read
            return
        body = self._read_body() if self.command in ("POST", "PUT") else None
        if self.command in ("POST", "PUT") and body is None:
            return
        if self.command == "POST" and INFER_PATH.match(path):
            if self.headers.get("Content-Encoding", "identity").lower() != "identity":
                self._refuse(415, "compressed requests are not accepted; send the body uncompressed")
                return
            header_length = self.headers.get("Inference-Header-Content-Length")
            try:
                split = len(body) if header_length is None else int(header_length)
                if not 0 <= split <= len(body):
                    raise ValueError
            except ValueError:
                self._refuse(400, f"Inference-Header-Content-Length {header_length!r} does not fit the "
                                  f"{len(body)}-byte body")
                return
            try:
                check_infer_request(body[:split], len(body) - split, self.server.max_request_bytes)
            except GateError as e:
                self._refuse(e.status, str(e))
                return
        self._forward(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


class GateServer(ThreadingHTTPServer):
    """The gate on (host, port), forwarding to Triton's HTTP endpoint on 127.0.0.1:triton_port."""

    daemon_threads = True

    def __init__(self, host: str, port: int, triton_port: int, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.triton_port = triton_port
        self.max_request_bytes = max_request_bytes
        self._local = threading.local()  # one keep-alive connection to Triton per gate thread
        super().__init__((host, port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        conn.settimeout(CLIENT_TIMEOUT_S)
        return conn, address

    def triton_connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.triton_port, timeout=None)
        return conn

    def drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def start_gate(host: str, port: int, triton_port: int, max_request_bytes: int) -> GateServer:
    """Bind the gate now (so a taken port fails before Triton starts) and serve it from a daemon thread."""
    gate = GateServer(host, port, triton_port, max_request_bytes)
    threading.Thread(target=gate.serve_forever, name="focalrt-gate", daemon=True).start()
    return gate
