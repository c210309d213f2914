"""HTTP/2 client for tests/h2.rs, on the `h2` package (PyPI) over TLS with ALPN h2: many
streams on one connection, the floods HTTP/2 servers must survive, and a reload under load.
Prints one JSON object (`requests`: one `name.field=JSON` line per answer field); the Rust
test judges it.

usage: h2_client.py PORT streams N PATH
       h2_client.py PORT flood rapid_reset|continuation|settings|ping|empty_data
       h2_client.py PORT flood zero_window PATH
       h2_client.py PORT reload N PATH MASTER_PID
       h2_client.py PORT idle
       h2_client.py PORT cancel PATH
       h2_client.py PORT malformed PATH
       h2_client.py PORT requests UPLOAD_FILE DOWNLOAD_PATH
"""

import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

HOST = "backend.test"


def connect(port, window=None, validate=True):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname=HOST)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=validate,
        normalize_outbound_headers=validate,
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    if window is not None:
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    sock.sendall(conn.data_to_send())
    return sock, conn


def headers(path, method="GET"):
    return [(":method", method), (":scheme", "https"), (":authority", HOST), (":path", path)]


class Streams:
    """What came back on each stream, and how the connection ended."""

    def __init__(self):
        self.status = {}
        self.body = {}
        self.ended = set()
        self.reset = {}
        self.goaway = []  # (error_code, last_stream_id)
        self.closed = False
        self.raw = b""
        self.error = None
        # Read straight off the wire (see `frames`).
        self.wire_ended = set()
        self.wire_reset = {}
        self.wire_bytes = {}
        self.pongs = b""
        self.headers = {}
        self.sha = {}
        self.text = {}

    def frames(self, data):
        """Frames read straight off the wire: the `h2` package gives up on a connection once
        it got a GOAWAY (later frames are a ProtocolError to it) or sent a flood itself, but
        the streams the server still finishes, and its GOAWAYs, are what the tests judge.
        After a GOAWAY, PINGs are answered here (the server's graceful close waits for it)."""
        self.raw += data
        while len(self.raw) >= 9:
            length = int.from_bytes(self.raw[:3], "big")
            if len(self.raw) < 9 + length:
                break
            kind, flags = self.raw[3], self.raw[4]
            stream = int.from_bytes(self.raw[5:9], "big") & 0x7FFFFFFF
            payload = self.raw[9 : 9 + length]
            self.raw = self.raw[9 + length :]
            if kind == 0x7 and length >= 8:
                last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                self.goaway.append((int.from_bytes(payload[4:8], "big"), last))
            elif kind in (0x0, 0x1) and flags & 0x1:
                self.wire_ended.add(stream)
            elif kind == 0x3:
                self.wire_reset[stream] = int.from_bytes(payload[:4], "big")
            elif kind == 0x6 and not flags & 0x1 and self.goaway:
                self.pongs += raw_frame(0x6, 0x1, 0, payload)
            if kind == 0x0:
                self.wire_bytes[stream] = self.wire_bytes.get(stream, 0) + length

    def feed(self, conn, data, ack=True):
        self.frames(data)
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                fields = {k.decode(): v.decode() for k, v in ev.headers}
                self.status[ev.stream_id] = int(fields[":status"])
                self.headers[ev.stream_id] = fields
            elif isinstance(ev, h2.events.DataReceived):
                self.body[ev.stream_id] = self.body.get(ev.stream_id, 0) + len(ev.data)
                self.sha.setdefault(ev.stream_id, hashlib.sha256()).update(ev.data)
                if self.body[ev.stream_id] <= 1024:
                    self.text[ev.stream_id] = self.text.get(ev.stream_id, "") + ev.data.decode("latin-1")
                if ack and ev.flow_controlled_length:
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.reset[ev.stream_id] = int(ev.error_code)

    def pump(self, sock, conn, done, deadline, ack=True):
        """Reads until `done()`, the connection's end, or the deadline."""
        while not done() and time.time() < deadline:
            sock.settimeout(max(0.05, deadline - time.time()))
            try:
                data = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            except (ConnectionError, ssl.SSLError, OSError):
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            try:
                self.feed(conn, data, ack)
            except Exception as e:  # a frame on a connection h2 already considers closed
                self.error = repr(e)
            out = conn.data_to_send() + self.pongs
            self.pongs = b""
            if out:
                try:
                    sock.sendall(out)
                except OSError:
                    self.closed = True
                    break


def open_streams(port, n, path):
    """A connection with n GETs of path sent at once: (socket, connection, stream ids)."""
    sock, conn = connect(port)
    ids = []
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers(path), end_stream=True)
        ids.append(sid)
    sock.sendall(conn.data_to_send())
    return sock, conn, ids


def streams(port, n, path):
    sock, conn, ids = open_streams(port, n, path)
    s = Streams()
    s.pump(sock, conn, lambda: all(i in s.ended or i in s.reset for i in ids), time.time() + 20)
    return {
        "statuses": [s.status.get(i, 0) for i in ids],
        "bytes": [s.body.get(i, 0) for i in ids],
        "ended": sum(1 for i in ids if i in s.ended),
        "reset": len(s.reset),
        "max_streams": conn.remote_settings.max_concurrent_streams,
    }


def raw_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def flood(port, kind, path=None):
    s = Streams()
    start = time.time()
    if kind == "zero_window":
        # The server may send no DATA at all: the stream's window is 0 and never opens.
        sock, conn = connect(port, window=0)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers(path), end_stream=True)
        sock.sendall(conn.data_to_send())
        s.pump(sock, conn, lambda: s.closed, time.time() + 10, ack=False)
    else:
        sock, conn = connect(port)
        out = b""
        if kind == "rapid_reset":
            for _ in range(2000):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers("/"), end_stream=True)
                conn.reset_stream(sid)
            out = conn.data_to_send()
        elif kind == "continuation":
            # HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
            block = b"\x82\x87\x84"  # :method GET, :scheme https, :path /
            out = raw_frame(0x1, 0x1, 1, block)  # END_STREAM, no END_HEADERS
            out += b"".join(raw_frame(0x9, 0x0, 1, b"\x40\x01a\x01b") for _ in range(10000))
        elif kind == "empty_data":
            # A POST stream whose body is empty DATA frames that never end it.
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers("/api/upload", "POST"))
            out = conn.data_to_send()
            out += b"".join(raw_frame(0x0, 0x0, sid, b"") for _ in range(10000))
        elif kind == "settings":
            out = b"".join(raw_frame(0x4, 0x0, 0, b"") for _ in range(10000))
        elif kind == "ping":
            out = b"".join(raw_frame(0x6, 0x0, 0, struct.pack(">Q", i)) for i in range(10000))
        try:
            sock.sendall(out)
        except OSError:
            s.closed = True
        s.pump(sock, conn, lambda: s.closed, time.time() + 10)
    return {
        "closed": s.closed,
        "goaway": s.goaway,
        "seconds": round(time.time() - start, 2),
        "statuses": list(s.status.values()),
        "resets": list(s.reset.values()),
    }


def reload(port, n, path, pid):
    sock, conn, ids = open_streams(port, n, path)
    s = Streams()
    # Let every stream reach the backend, then reload.
    s.pump(sock, conn, lambda: False, time.time() + 0.5)
    os.kill(pid, signal.SIGHUP)
    over = lambda: all(i in s.wire_ended or i in s.wire_reset for i in ids)
    s.pump(sock, conn, lambda: over() and len(s.goaway) >= 2, time.time() + 20)
    last = s.goaway[-1][1] if s.goaway else None
    done = [i for i in ids if i in s.wire_ended and i not in s.wire_reset]
    return {
        "complete": sum(1 for i in done if s.wire_bytes.get(i, 0) > 0),
        "refused": sum(1 for i in ids if last is not None and i > last and i not in s.wire_ended),
        "reset": {str(k): v for k, v in s.wire_reset.items()},
        "goaway": s.goaway,
        "closed": s.closed,
        "n": n,
    }


def idle(port):
    """Opens a connection and sends nothing more: how and when does the server end it?"""
    sock, conn = connect(port)
    s = Streams()
    start = time.time()
    s.pump(sock, conn, lambda: s.closed, time.time() + 10)
    return {"closed": s.closed, "goaway": s.goaway, "seconds": round(time.time() - start, 2)}


def cancel(port, path):
    """Opens a stream, resets it (CANCEL) after 0.3 s, and keeps the connection for 2 s."""
    sock, conn = connect(port)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers(path), end_stream=True)
    sock.sendall(conn.data_to_send())
    s = Streams()
    s.pump(sock, conn, lambda: False, time.time() + 0.3)
    conn.reset_stream(sid)
    sock.sendall(conn.data_to_send())
    s.pump(sock, conn, lambda: False, time.time() + 2)
    return {"closed": s.closed, "statuses": list(s.status.values())}


def malformed(port, path):
    """Requests HTTP/2 forbids, each on a connection of its own, then a good request on the
    same connection if it is still open: what did each get?"""
    cases = {
        "connection": [("connection", "keep-alive")],
        "transfer-encoding": [("transfer-encoding", "chunked")],
        "te": [("te", "gzip")],
        "uppercase": [("X-Upper", "1")],
        "content-length": None,
    }
    out = {}
    for name, extra in cases.items():
        sock, conn = connect(port, validate=False)
        sid = conn.get_next_available_stream_id()
        if extra is None:
            # A body longer than its content-length.
            conn.send_headers(sid, headers(path, "POST") + [("content-length", "3")])
            conn.send_data(sid, b"12345", end_stream=True)
        else:
            conn.send_headers(sid, headers(path) + extra, end_stream=True)
        sock.sendall(conn.data_to_send())
        s = Streams()
        s.pump(sock, conn, lambda: sid in s.wire_ended or sid in s.wire_reset or s.goaway, time.time() + 5)
        good = None
        if not s.goaway and not s.closed:
            good = conn.get_next_available_stream_id()
            conn.send_headers(good, headers(path), end_stream=True)
            sock.sendall(conn.data_to_send())
            s.pump(sock, conn, lambda: good in s.wire_ended, time.time() + 5)
        out[name] = {
            "reset": s.wire_reset.get(sid),
            "answered": sid in s.wire_ended,
            "goaway": [g[0] for g in s.goaway],
            "then": s.status.get(good) if good else None,
        }
        sock.close()
    return out


def request(sock, conn, s, method, path, extra=(), body=None):
    """One request on the connection, its body sent as the server's windows allow; the
    answer as status, chosen fields, body length, sha256 and (short bodies) text."""
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers(path, method) + list(extra), end_stream=body is None)
    sock.sendall(conn.data_to_send())
    deadline = time.time() + 60
    if body is not None:
        at = 0
        while at < len(body) and time.time() < deadline:
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if room == 0:
                s.pump(sock, conn, lambda: conn.local_flow_control_window(sid) > 0, deadline)
                continue
            conn.send_data(sid, body[at : at + room])
            at += room
            sock.sendall(conn.data_to_send())
        conn.end_stream(sid)
        sock.sendall(conn.data_to_send())
    s.pump(sock, conn, lambda: sid in s.ended or sid in s.reset, deadline)
    fields = s.headers.get(sid, {})
    return {
        "status": s.status.get(sid, 0),
        "length": s.body.get(sid, 0),
        "sha256": s.sha.get(sid, hashlib.sha256()).hexdigest(),
        "text": s.text.get(sid, ""),
        "content-length": fields.get("content-length"),
        "etag": fields.get("etag"),
        "location": fields.get("location"),
        "ended": sid in s.ended,
    }


def requests(port, upload, download):
    """GET, HEAD, a range, a 304, a redirect, a proxied GET, a POST of the file `upload` to
    the proxy and a proxied download of `download`, in turn on one connection."""
    sock, conn = connect(port)
    s = Streams()
    out = {}
    out["get"] = request(sock, conn, s, "GET", "/index.html")
    out["head"] = request(sock, conn, s, "HEAD", "/index.html")
    out["range"] = request(sock, conn, s, "GET", "/mid.bin", [("range", "bytes=100-199")])
    etag = out["get"]["etag"] or ""
    out["304"] = request(sock, conn, s, "GET", "/index.html", [("if-none-match", etag)])
    out["redirect"] = request(sock, conn, s, "GET", "/r/x")
    out["proxied"] = request(sock, conn, s, "GET", "/api/echo?q=1")
    with open(upload, "rb") as f:
        data = f.read()
    length = [("content-length", str(len(data)))]
    out["post"] = request(sock, conn, s, "POST", "/api/upload", length, data)
    out["download"] = request(sock, conn, s, "GET", download)
    sock.close()
    return out


def main():
    port, cmd = int(sys.argv[1]), sys.argv[2]
    if cmd == "streams":
        r = streams(port, int(sys.argv[3]), sys.argv[4])
    elif cmd == "flood":
        r = flood(port, sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif cmd == "malformed":
        r = malformed(port, sys.argv[3])
    elif cmd == "cancel":
        r = cancel(port, sys.argv[3])
    elif cmd == "idle":
        r = idle(port)
    elif cmd == "requests":
        # One line per answer field, `name.field=JSON`: easy to look up from the Rust test.
        r = requests(port, sys.argv[3], sys.argv[4])
        for name, fields in r.items():
            for key, value in fields.items():
                print(f"{name}.{key}={json.dumps(value)}")
        return
    elif cmd == "reload":
        r = reload(port, int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
