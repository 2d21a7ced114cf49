#!/usr/bin/env python3
"""Writes the seed corpus of h2_fuzz (tests/fuzz/corpus/h2/): plaintext HTTP/2 byte
streams as a client sends them after TLS, built frame by frame (HPACK literals without
Huffman coding), so that the fuzzer starts from inputs that reach the relay's decision,
its refusals, the gRPC frame inspector, resets and GOAWAY. Run from anywhere; rewrites
the folder."""
import os
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def string(s):
    b = s.encode() if isinstance(s, str) else s
    assert len(b) < 127
    return bytes([len(b)]) + b


def literal(index_or_name, value):
    """Literal header field without indexing (RFC 7541 6.2.2)."""
    if isinstance(index_or_name, int):
        assert index_or_name < 15
        return bytes([index_or_name]) + string(value)
    return b"\x00" + string(index_or_name) + string(value)


def request_block(path, extra=()):
    block = b"\x83\x86"  # :method POST, :scheme http (static table)
    block += literal(4, path) + literal(1, "relay")  # :path, :authority
    block += b"\x0f\x10" + string("application/grpc")  # content-type (static 31)
    block += literal("te", "trailers")
    for name, value in extra:
        block += literal(name, value)
    return block


def grpc(payload, length=None):
    return b"\x00" + struct.pack(">I", len(payload) if length is None else length) + payload


def start():
    return PREFACE + frame(SETTINGS, 0, 0)


seeds = {
    "unary_allowed": start() + frame(HEADERS, END_HEADERS, 1, request_block("/shardguard.v1.Pipeline/Forward"))
    + frame(DATA, END_STREAM, 1, grpc(b"hello")),
    "unary_denied": start() + frame(HEADERS, END_HEADERS, 1, request_block("/x.Y/deny"))
    + frame(DATA, END_STREAM, 1, grpc(b"secret")),
    "continuation": start() + frame(HEADERS, 0, 1, request_block("/a.B/C", [("x-a", "1" * 40)])[:20])
    + frame(CONTINUATION, END_HEADERS, 1, request_block("/a.B/C", [("x-a", "1" * 40)])[20:])
    + frame(DATA, END_STREAM, 1, grpc(b"")),
    "reset_mid_message": start() + frame(HEADERS, END_HEADERS, 1, request_block("/a.B/C"))
    + frame(DATA, 0, 1, grpc(b"half", length=100)) + frame(RST_STREAM, 0, 1, struct.pack(">I", 8)),
    "oversized_prefix": start() + frame(HEADERS, END_HEADERS, 1, request_block("/a.B/C"))
    + frame(DATA, 0, 1, grpc(b"", length=1 << 30)),
    "inspect_two_messages": start() + frame(HEADERS, END_HEADERS, 1, request_block("/x.Export/inspect"))
    + frame(DATA, 0, 1, grpc(b"one") + grpc(b"tw")) + frame(DATA, END_STREAM, 1, b"o"),
    "inspect_refused": start() + frame(HEADERS, END_HEADERS, 1, request_block("/x.Export/inspect"))
    + frame(DATA, END_STREAM, 1, grpc(b"refuse")),
    "two_streams_goaway": start() + frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block("/a.B/C"))
    + frame(HEADERS, END_HEADERS, 3, request_block("/x.Y/deny")) + frame(PING, 0, 0, b"12345678")
    + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1000)) + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)),
    "big_header_list": start() + frame(HEADERS, END_HEADERS, 1,
                                       request_block("/a.B/C", [("x-%d" % i, "v" * 100) for i in range(50)])),
}

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus", "h2")
os.makedirs(out, exist_ok=True)
for old in os.listdir(out):
    os.remove(os.path.join(out, old))
for name, data in seeds.items():
    with open(os.path.join(out, name + ".bin"), "wb") as f:
        f.write(data)
print("wrote %d seeds to %s" % (len(seeds), out))
