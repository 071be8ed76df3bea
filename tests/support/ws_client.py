#!/usr/bin/env python3
"""WebSocket client: ws_client.py URL [CA_FILE [SERVER_NAME]]. Connects, checks the server's first
message names the path it saw, then sends text and binary messages of growing size and checks
each echo. Prints one JSON line {"ok": true, "path": ..., "messages": N, "bytes": B}; exits 1
with a reason otherwise."""

import asyncio
import json
import os
import ssl
import sys

import websockets


async def main():
    url = sys.argv[1]
    kwargs = {"max_size": None, "open_timeout": 10}
    if len(sys.argv) > 2:
        kwargs["ssl"] = ssl.create_default_context(cafile=sys.argv[2])
    if len(sys.argv) > 3:
        kwargs["server_hostname"] = sys.argv[3]
    total = 0
    count = 0
    async with websockets.connect(url, **kwargs) as ws:
        first = await asyncio.wait_for(ws.recv(), 10)
        for i in range(50):
            msg = "text message %d " % i + "x" * (i * 37)
            await ws.send(msg)
            back = await asyncio.wait_for(ws.recv(), 10)
            if back != msg:
                sys.exit("text echo %d differs" % i)
            total += len(msg)
            count += 1
        for size in (1, 1000, 65536, 1 << 20, 4 << 20):
            data = os.urandom(size)
            await ws.send(data)
            back = await asyncio.wait_for(ws.recv(), 30)
            if back != data:
                sys.exit("binary echo of %d bytes differs" % size)
            total += size
            count += 1
    print(json.dumps({"ok": True, "path": first, "messages": count, "bytes": total}))


asyncio.run(main())
