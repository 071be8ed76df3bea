#!/usr/bin/env python3
"""A minimal, fast keep-alive HTTP responder on 127.0.0.1: every request head (up to its
blank line; requests must have no body) gets {"message": "hello from NAME"} at once, in one
write. Prints {"port": N} once listening. For tests that need answers faster than
http.server gives them."""

import asyncio
import json
import sys

NAME = sys.argv[1] if len(sys.argv) > 1 else "fast"
BODY = json.dumps({"message": "hello from " + NAME}).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


class Responder(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(RESPONSE * n)


async def main():
    server = await asyncio.get_running_loop().create_server(Responder, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Future()


asyncio.run(main())
