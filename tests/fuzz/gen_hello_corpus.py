#!/usr/bin/env python3
"""Writes the seed corpus of hello_fuzz (tests/fuzz/corpus/hello/): the first
flight of real TLS clients (Python's ssl, i.e. OpenSSL) with the ALPN lists and
versions the sidecar's acceptor tells apart, a ClientHello split over two records,
and the plaintext probes it refuses. Run from anywhere: python3 gen_hello_corpus.py
"""
import os
import ssl

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "hello")


def client_hello(alpn, max_version=ssl.TLSVersion.TLSv1_3, min_version=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if min_version is not None:
        ctx.minimum_version = min_version
    ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="shard-0.example")
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def split_records(hello):
    """The same handshake message in two TLS records."""
    body = hello[5:]
    cut = len(body) // 2
    head = hello[:3]
    rec = lambda part: head + len(part).to_bytes(2, "big") + part
    return rec(body[:cut]) + rec(body[cut:])


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "h2_tls13.bin": client_hello(["h2"]),
        "grpc_exp_h2_tls12.bin": client_hello(["grpc-exp", "h2"], ssl.TLSVersion.TLSv1_2),
        "http11_alpn.bin": client_hello(["http/1.1"]),
        "no_alpn.bin": client_hello(None),
        "h2_split_records.bin": split_records(client_hello(["h2", "http/1.1"])),
        "http1_get.bin": b"GET / HTTP/1.1\r\nHost: shard\r\n\r\n",
        "h2_preface.bin": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
