#!/usr/bin/env python3
"""A small private web service for the HTTP entry point's end-to-end tests.

Speaks HTTP/1.1 with keep-alive (one thread per connection). Prints {"port": N} on stdout
once listening on 127.0.0.1. Routes:

  GET  /                 a page whose stylesheet, script, image and API call use absolute paths
  GET  /css/app.css, /js/app.js, /img/logo.svg, /api/data   its assets
  GET  /whoami           JSON: service name, path, and the X-Forwarded-* headers received
  POST /upload           reads the body (Content-Length or chunked), answers its sha256 and length
  GET  /download?n=N&seed=S   N deterministic bytes (Content-Length), their sha256 in
                         X-Content-Sha256
  GET  /chunked          a chunked response; its body is "chunk-0\\n" ... "chunk-9\\n"
  GET  /redirect         302 to the absolute path /whoami
  GET  /redirect-abs     302 to http://<Host>/whoami
  GET  /requests         JSON list of every path requested so far
"""

import hashlib
import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

NAME = sys.argv[1] if len(sys.argv) > 1 else "backend"
SEEN = []
SEEN_LOCK = threading.Lock()

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>%(name)s behind dialback</title>
<link rel="stylesheet" href="/css/app.css">
<script src="/js/app.js" defer></script>
</head>
<body>
<h1 id="title">Service %(name)s</h1>
<p>Everything on this page is loaded with absolute paths.</p>
<img id="logo" src="/img/logo.svg" width="120" height="120" alt="logo"
     onload="document.body.dataset.img='ok'" onerror="document.body.dataset.img='failed'">
<p id="api">api: pending</p>
</body></html>
"""

CSS = b"#title { color: rgb(10, 120, 200); font-family: sans-serif; }\nbody { background: #f4f8fb; }\n"

JS = b"""
document.body.dataset.js = 'ok';
var t = getComputedStyle(document.getElementById('title')).color;
document.body.dataset.css = (t === 'rgb(10, 120, 200)') ? 'ok' : 'failed:' + t;
fetch('/api/data').then(function (r) { return r.json(); }).then(function (d) {
  document.getElementById('api').textContent = 'api: ' + d.message;
  document.body.dataset.api = 'ok';
}).catch(function (e) { document.body.dataset.api = 'failed:' + e; });
"""

SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="120" height="120">
<circle cx="60" cy="60" r="50" fill="rgb(10,120,200)"/></svg>
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # peer's delayed ACK (40 ms per response).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def send_body(self, status, ctype, body, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        total = 0
        while total < n:
            chunk = self.rfile.read(min(1 << 20, n - total))
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
        return (h, total)

    def do_GET(self):
        url = urlsplit(self.path)
        with SEEN_LOCK:
            SEEN.append(self.path)
        if url.path == "/":
            self.send_body(200, "text/html; charset=utf-8", (PAGE % {"name": NAME}).encode())
        elif url.path == "/css/app.css":
            self.send_body(200, "text/css", CSS)
        elif url.path == "/js/app.js":
            self.send_body(200, "application/javascript", JS)
        elif url.path == "/img/logo.svg":
            self.send_body(200, "image/svg+xml", SVG)
        elif url.path == "/api/data":
            self.send_body(200, "application/json", json.dumps({"message": "hello from " + NAME}).encode())
        elif url.path == "/whoami":
            info = {
                "service": NAME,
                "path": self.path,
                "cookie": self.headers.get("Cookie"),
                "x-forwarded-for": self.headers.get("X-Forwarded-For"),
                "x-forwarded-proto": self.headers.get("X-Forwarded-Proto"),
                "x-forwarded-host": self.headers.get("X-Forwarded-Host"),
                "x-forwarded-prefix": self.headers.get("X-Forwarded-Prefix"),
            }
            self.send_body(200, "application/json", json.dumps(info).encode())
        elif url.path == "/download":
            q = parse_qs(url.query)
            n = int(q.get("n", ["0"])[0])
            seed = int(q.get("seed", ["1"])[0])
            body = random.Random(seed).randbytes(n)
            digest = hashlib.sha256(body).hexdigest()
            self.send_body(200, "application/octet-stream", body, [("X-Content-Sha256", digest)])
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(10):
                piece = ("chunk-%d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/redirect":
            self.send_body(302, "text/plain", b"moved\n", [("Location", "/whoami")])
        elif url.path == "/redirect-abs":
            host = self.headers.get("Host", "")
            self.send_body(302, "text/plain", b"moved\n", [("Location", "http://%s/whoami" % host)])
        elif url.path == "/requests":
            with SEEN_LOCK:
                body = json.dumps(SEEN).encode()
            self.send_body(200, "application/json", body)
        else:
            self.send_body(404, "text/plain", b"not here\n")

    do_HEAD = do_GET

    def do_POST(self):
        with SEEN_LOCK:
            SEEN.append(self.path)
        got = self.read_body()
        if isinstance(got, bytes):
            digest, length = hashlib.sha256(got).hexdigest(), len(got)
        else:
            digest, length = got[0].hexdigest(), got[1]
        body = json.dumps({"service": NAME, "sha256": digest, "len": length}).encode()
        self.send_body(200, "application/json", body)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
