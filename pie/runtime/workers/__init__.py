"""Worker processes: where wasm instances run, and the line between them and the control
process (frames, channels, the outbox that batches a worker's operations per engine step)."""
