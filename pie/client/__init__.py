"""`pie.client`: talk to a `pie serve` over its WebSocket protocol (docs/protocol.md).

    async with PieClient.connect("ws://127.0.0.1:8080/ws", token=None) as client:
        program = await client.upload(wasm_bytes)
        instance = await client.launch(program, ["Hello!"])
        async for event in instance.events():
            ...
`PieClientSync` is the same for code without an event loop.
"""

from pie.client.connection import PieClient, RemoteInstance
from pie.client.errors import ConnectionLost, InstanceError, PieClientError, ServerError
from pie.client.sync import PieClientSync, SyncInstance

__all__ = [
    "ConnectionLost",
    "InstanceError",
    "PieClient",
    "PieClientError",
    "PieClientSync",
    "RemoteInstance",
    "ServerError",
    "SyncInstance",
]
