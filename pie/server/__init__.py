"""The server layer: `pie serve` puts a runtime on the network (WebSocket client protocol,
OpenAI-compatible HTTP API, metrics, a web page). See docs/protocol.md for the wire format."""
