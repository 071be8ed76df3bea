#!/usr/bin/env python3
"""WebSocket echo server on 127.0.0.1 (the `websockets` library). Prints {"port": N} once
listening; every message comes back as it was sent, text or binary. The path the handshake
asked for is sent first, as a text message "path:<path>"."""

import asyncio
import json

import websockets


async def echo(ws, *_):
    request = getattr(ws, "request", None)
    path = request.path if request is not None else getattr(ws, "path", "?")
    await ws.send("path:" + path)
    async for message in ws:
        await ws.send(message)


async def main():
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await asyncio.Future()


asyncio.run(main())
