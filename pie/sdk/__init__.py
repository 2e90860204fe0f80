"""The Pie inferlet SDK: models, contexts, samplers and messaging over the `pie:inferlet` WIT.

An inferlet is a module with `def main(args) -> str` (or `async def`). The same SDK runs inside
the WebAssembly sandbox (componentize-py bindings) and natively (`pie run --native`).
"""

# Submodules a program imports by name: imported here so every build bundles them.
from pie.sdk import grammar, http, mcp, window
from pie.sdk._wit import PieError
from pie.sdk.chat import Chat
from pie.sdk.context import Context
from pie.sdk.io import (
    Child,
    EndOfInput,
    Subscription,
    args,
    broadcast,
    instance_id,
    launch,
    messages,
    models,
    pull,
    push,
    receive,
    receive_blob,
    send,
    send_blob,
    subscribe,
    version,
)
from pie.sdk.loop import PieEventLoop, run
from pie.sdk.masks import allowed_tokens, runs
from pie.sdk.model import Model, StreamDecoder, Tokenizer
from pie.sdk.sampler import (
    Distribution,
    Entropy,
    Greedy,
    Logits,
    Logprobs,
    RawLogits,
    Sample,
    Sampler,
    TopK,
)

__all__ = [
    "Chat",
    "Child",
    "Context",
    "Distribution",
    "EndOfInput",
    "Entropy",
    "Greedy",
    "Logits",
    "Logprobs",
    "Model",
    "PieError",
    "PieEventLoop",
    "RawLogits",
    "Sample",
    "Sampler",
    "StreamDecoder",
    "Subscription",
    "Tokenizer",
    "TopK",
    "allowed_tokens",
    "args",
    "broadcast",
    "grammar",
    "http",
    "instance_id",
    "launch",
    "mcp",
    "messages",
    "models",
    "pull",
    "push",
    "receive",
    "receive_blob",
    "run",
    "runs",
    "send",
    "send_blob",
    "subscribe",
    "version",
    "window",
]
