"""The wasm glue: registers the host implementation into a wasmtime component `Linker`.

Each WIT function becomes a Python callable, reached through the trampoline of
`wasm_calls.py` (which finds the calling instance by its thread and converts the raw values),
that turns wasmtime values (Record, Variant) into host types, calls the one host implementation
in `runtime/host/`, and converts back. No Python exception may escape a host function: wasmtime
parks it in a module global that another instance's thread would re-raise. So every error a
guest can handle returns as a WIT `err`, and everything else raises `WasmtimeError` (carried
per call), which traps only the calling instance. Every few epoch ticks a deadline callback
checks the running instance (`watch_deadline`): stopped, or past its CPU or wall time (waits do
not count as CPU), it traps there, even if it never calls the host.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import component as wc

from pie.engine.request import (
    DistributionResult,
    Entropy,
    EntropyResult,
    Greedy,
    LogProbs,
    LogProbsResult,
    RawLogits,
    Sample,
    SamplerSpec,
    TokenResult,
    TopKDistribution,
)
from pie.runtime import wasm_calls
from pie.runtime.calls import ForwardCall, GeneratedChunk, GenerateSpec
from pie.runtime.errors import GUEST_ERRORS, HostError, InstanceTrap
from pie.runtime.host import (
    forward,
    grammar,
    http,
    kv,
    mcp,
    messaging,
    model,
    poll,
    runtime_api,
    session,
)
from pie.runtime.host.forward import LogitsRef
from pie.runtime.host.state import InstanceHost
from pie.runtime.wit import interface_name

log = logging.getLogger(__name__)

TICK_SECONDS = 0.01  # epoch period (a running guest is checked every CHECK_TICKS of them)

# How a function's value crosses back: PLAIN (no result type), RESULT (result<T, string> whose
# T is no string-like: wasmtime lowers T as ok and a str as err), TAGGED (result<string-like,
# string>: wasmtime needs Variant('ok'|'err', value)).
PLAIN, RESULT, TAGGED = "plain", "result", "tagged"


# ---- value conversions -----------------------------------------------------------------------------
def _field(record: Any, name: str) -> Any:
    return getattr(record, name)


def sampler_from_wasm(value: Any) -> SamplerSpec:
    tag, p = value.tag, value.payload
    if tag == "greedy":
        return Greedy()
    if tag == "sample":
        return Sample(
            temperature=float(_field(p, "temperature")),
            top_k=int(_field(p, "top-k")),
            top_p=float(_field(p, "top-p")),
            min_p=float(_field(p, "min-p")),
            seed=_field(p, "seed"),
        )
    if tag == "distribution":
        return TopKDistribution(k=int(_field(p, "k")), temperature=float(_field(p, "temperature")))
    if tag == "raw-logits":
        return RawLogits()
    if tag == "logprobs":
        return LogProbs(tuple(p))
    if tag == "entropy":
        return Entropy()
    raise HostError(f"unknown sampler {tag!r}")


def forward_call_from_wasm(args: Any) -> ForwardCall:
    return ForwardCall(
        tokens=_field(args, "tokens"),
        positions=_field(args, "positions"),
        attention_mask=_field(args, "attention-mask"),
        logit_mask=_field(args, "logit-mask"),
        outputs=[
            (int(_field(o, "index")), sampler_from_wasm(_field(o, "sampler")))
            for o in _field(args, "outputs")
        ],
    )


def generate_spec_from_wasm(args: Any) -> GenerateSpec:
    sampler = sampler_from_wasm(_field(args, "sampler"))
    if not isinstance(sampler, Greedy | Sample):
        raise HostError("a delegated generation samples with greedy or sample only")
    return GenerateSpec(
        tokens=_field(args, "tokens"),
        sampler=sampler,
        max_tokens=int(_field(args, "max-tokens")),
        stop_tokens=frozenset(_field(args, "stop-tokens")),
        stop_strings=tuple(_field(args, "stop-strings")),
        stream=bool(_field(args, "stream-to-client")),
        chunk_tokens=int(_field(args, "chunk-tokens")),
        text=bool(_field(args, "text")),
    )


def generated_to_wasm(chunk: GeneratedChunk) -> wc.Record:
    return _record(tokens=chunk.tokens, text=chunk.text, finish=chunk.finish)


def output_to_wasm(out: Any) -> wc.Variant:
    if isinstance(out, TokenResult):
        return wc.Variant("token", int(out.token_id))
    if isinstance(out, DistributionResult):
        return wc.Variant(
            "distribution", ([int(t) for t in out.token_ids], [float(p) for p in out.probs])
        )
    if isinstance(out, LogProbsResult):
        return wc.Variant("logprobs", [float(v) for v in out.logprobs])
    if isinstance(out, EntropyResult):
        return wc.Variant("entropy", float(out.entropy))
    if isinstance(out, LogitsRef):
        return wc.Variant("logits", out.handle)
    raise TypeError(f"no WIT output for {type(out).__name__}")


def _record(**fields: Any) -> wc.Record:
    record = wc.Record()
    for name, value in fields.items():
        setattr(record, name.replace("_", "-"), value)
    return record


def _record_or_none(value: Any) -> wc.Record | None:
    """A dataclass as a WIT record, None as an empty option."""
    return None if value is None else _record(**dataclasses.asdict(value))


def model_info_to_wasm(info: model.ModelInfo) -> wc.Record:
    return _record(
        name=info.name,
        vocab_size=info.vocab_size,
        page_size=info.page_size,
        max_position=info.max_position,
    )


# ---- the table: WIT function → (host function with wasm conversions, return kind) ---------------
HostFn = Callable[..., Any]

FUNCTIONS: dict[str, dict[str, tuple[HostFn, str]]] = {
    "runtime": {
        "version": (runtime_api.version, PLAIN),
        "instance-id": (runtime_api.instance_id, PLAIN),
        "arguments": (runtime_api.arguments, PLAIN),
        "models": (runtime_api.models, PLAIN),
        "program": (runtime_api.program, PLAIN),
        "launch": (runtime_api.launch, RESULT),
        "cancel": (runtime_api.cancel, RESULT),
    },
    "poll": {
        "wait-any": (poll.wait_any, RESULT),
        "is-ready": (poll.is_ready, RESULT),
        "take-text": (poll.take_text, TAGGED),
        "take-blob": (poll.take_blob, RESULT),
        "discard": (poll.discard, RESULT),
    },
    "model": {
        "open": (model.open_model, RESULT),
        "info": (lambda h, m: model_info_to_wasm(model.info(h, m)), RESULT),
        "encode": (model.encode, RESULT),
        "decode": (model.decode, TAGGED),
        "token-text": (model.token_text, TAGGED),
        "token-id": (model.token_id, RESULT),
        "special-tokens": (model.special_tokens, RESULT),
        "stop-tokens": (model.stop_tokens, RESULT),
        "chat-template": (
            lambda h, m, msgs, gen: model.chat_template(
                h, m, [(_field(x, "role"), _field(x, "content")) for x in msgs], gen
            ),
            TAGGED,
        ),
        "decoder-new": (model.decoder_new, RESULT),
        "decoder-push": (model.decoder_push, TAGGED),
        "decoder-finish": (model.decoder_finish, TAGGED),
    },
    "kv": {
        "create": (kv.create, RESULT),
        "fork": (kv.fork, RESULT),
        "length": (kv.length, RESULT),
        "page-count": (kv.page_count, RESULT),
        "reserve": (kv.reserve, RESULT),
        "truncate": (kv.truncate, RESULT),
        "mask": (kv.mask, RESULT),
        "export-context": (kv.export_context, RESULT),
        "import-context": (kv.import_context, RESULT),
        "unexport": (kv.unexport, RESULT),
        "exports": (kv.exports, PLAIN),
        "save-snapshot": (kv.save_snapshot, RESULT),
        "open-snapshot": (kv.open_snapshot, RESULT),
        "delete-snapshot": (kv.delete_snapshot, RESULT),
        "snapshots": (kv.snapshots, PLAIN),
        "close": (kv.close, RESULT),
    },
    "forward": {
        "execute": (lambda h, c, a: forward.execute(h, c, forward_call_from_wasm(a)), RESULT),
        "execute-many": (
            lambda h, passes: forward.execute_many(
                h, [(c, forward_call_from_wasm(a)) for c, a in passes]
            ),
            PLAIN,  # one result per pass: an int lowers as ok, a str as err
        ),
        "outputs": (lambda h, f: [output_to_wasm(o) for o in forward.outputs(h, f)], RESULT),
        "execute-wait": (
            lambda h, c, a: [
                output_to_wasm(o) for o in forward.execute_wait(h, c, forward_call_from_wasm(a))
            ],
            RESULT,
        ),
        "logits-top-k": (forward.logits_top_k, RESULT),
        "logits-values": (forward.logits_values, RESULT),
        "logits-release": (forward.logits_release, RESULT),
        "generate": (lambda h, c, a: forward.generate(h, c, generate_spec_from_wasm(a)), RESULT),
        "generate-many": (
            lambda h, runs: forward.generate_many(
                h, [(c, generate_spec_from_wasm(a)) for c, a in runs]
            ),
            PLAIN,  # one result per loop: an int lowers as ok, a str as err
        ),
        "generate-next": (forward.generate_next, RESULT),
        "take-generated": (lambda h, f: generated_to_wasm(forward.take_generated(h, f)), RESULT),
        "generate-stop": (forward.generate_stop, RESULT),
    },
    "session": {
        "send": (session.send, RESULT),
        "send-blob": (session.send_blob, RESULT),
        "receive": (session.receive, RESULT),
        "receive-blob": (session.receive_blob, RESULT),
    },
    "messaging": {
        "push": (messaging.push, RESULT),
        "pull": (messaging.pull, RESULT),
        "broadcast": (messaging.broadcast, RESULT),
        "subscribe": (messaging.subscribe, RESULT),
        "next": (messaging.next_message, RESULT),
        "unsubscribe": (messaging.unsubscribe, RESULT),
    },
    "http": {
        "fetch": (lambda h, r: http.fetch(h, http_request_from_wasm(r)), RESULT),
        "take-response": (
            lambda h, f: http_response_to_wasm(http.take_response(h, f)),
            RESULT,
        ),
    },
    "mcp": {
        "servers": (mcp.servers, PLAIN),
        "list-tools": (mcp.list_tools, RESULT),
        "take-tools": (
            lambda h, f: [
                _record(name=t.name, description=t.description, input_schema=t.input_schema)
                for t in mcp.take_tools(h, f)
            ],
            RESULT,
        ),
        "call-tool": (
            lambda h, server, tool, arguments, timeout: mcp.call_tool(
                h, server, tool, arguments, None if timeout is None else int(timeout) / 1000
            ),
            RESULT,
        ),
        "take-result": (
            lambda h, f: _record(**dataclasses.asdict(mcp.take_result(h, f))),
            RESULT,
        ),
    },
    "grammar": {
        "from-json-schema": (grammar.from_json_schema, RESULT),
        "from-regex": (grammar.from_regex, RESULT),
        "from-lark": (grammar.from_lark, RESULT),
        "release": (grammar.release, RESULT),
        "constrain": (grammar.constrain, RESULT),
        "release-constraint": (grammar.release_constraint, RESULT),
        "constraint-state": (
            lambda h, c: _record_or_none(grammar.constraint_state(h, c)),
            RESULT,
        ),
    },
}


def http_request_from_wasm(req: Any) -> http.HttpRequest:
    timeout = _field(req, "timeout")
    return http.HttpRequest(
        method=str(_field(req, "method")),
        url=str(_field(req, "url")),
        headers=[(str(_field(x, "name")), str(_field(x, "value"))) for x in _field(req, "headers")],
        body=bytes(_field(req, "body")),
        timeout_s=None if timeout is None else int(timeout) / 1000,
    )


def http_response_to_wasm(response: http.HttpResponse) -> wc.Record:
    def record(**fields: Any) -> wc.Record:
        out = wc.Record()
        out.__dict__.update(fields)
        return out

    headers = [record(name=n, value=v) for n, v in response.headers]
    return record(status=response.status, headers=headers, body=response.body)


# wasmtime's epoch-deadline callback: (context, data, *delta, *kind) -> a wasmtime_error_t
# pointer to trap, or 0 to continue with the deadline `delta` ticks on.
_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = _Finalizer(lambda data: None)
_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
CHECK_TICKS = 5  # a running guest is checked for a stop or a spent limit every 50 ms


def set_deadline(context: Any, host: InstanceHost) -> None:
    """Epoch deadline = the next check: the instance's remaining CPU or wall time, or
    CHECK_TICKS, whichever is less (`watch_deadline` decides there whether it goes on).

    `context` is a raw store context (a host call's) or a Store (before instantiation).
    """
    if isinstance(context, wasmtime.Store):
        context = context._context()
    ffi.wasmtime_context_set_epoch_deadline(context, _ticks_to_check(host))


def _ticks_to_check(host: InstanceHost) -> int:
    remaining = min(host.cpu_remaining(), host.wall_remaining())
    if math.isinf(remaining):
        return CHECK_TICKS
    return min(CHECK_TICKS, max(1, math.ceil(remaining / TICK_SECONDS)))


def watch_deadline(store: wasmtime.Store, host: InstanceHost) -> Any:
    """At each epoch deadline, ends the instance if it was stopped or is past a time limit,
    else sets the next check. A guest that never calls the host (a busy loop, a print loop)
    so ends within CHECK_TICKS ticks of a cancel, not only at its CPU limit.

    Returns the callback object, which must live as long as the store.
    """

    def on_deadline(context: Any, data: Any, delta: Any, kind: Any) -> int:
        try:
            host.check_alive()
            if host.gate is not None:  # a guest computing for long: what it queued goes now
                host.gate.flush_if_stale()
            delta[0] = _ticks_to_check(host)
            kind[0] = _CONTINUE
            return 0
        except InstanceTrap as e:
            host.trap_reason = str(e)
        except Exception as e:  # never let an exception cross into wasmtime
            host.trap_reason = f"internal error at an epoch deadline: {e!r}"
        error = ffi.wasmtime_error_new(host.trap_reason.encode())
        return ctypes.cast(error, ctypes.c_void_p).value or 0

    callback = _DeadlineCallback(on_deadline)
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, _NO_FINALIZER)
    return callback


def _wrap(qualified: str, fn: HostFn, kind: str) -> Callable[..., Any]:
    def host_call(host: InstanceHost, context: Any, *args: Any) -> Any:
        waited = host.waited
        try:
            host.check_alive()
            value = fn(host, *args)
        except GUEST_ERRORS as e:
            message = str(e) or type(e).__name__
            if kind == PLAIN:  # no way to report it: end the instance with the message
                host.trap_reason = f"{qualified}: {message}"
                raise wasmtime.WasmtimeError(host.trap_reason) from None
            value = wc.Variant("err", message) if kind == TAGGED else message
        except InstanceTrap as e:
            host.trap_reason = str(e)
            raise wasmtime.WasmtimeError(str(e)) from None
        except Exception as e:
            log.exception("host call %s of instance %d failed", qualified, host.id)
            host.trap_reason = f"internal error in host call {qualified}: {e!r}"
            raise wasmtime.WasmtimeError(host.trap_reason) from None
        else:
            value = wc.Variant("ok", value) if kind == TAGGED else value
        if host.waited != waited:
            # A wait may outlast the deadline: set the next check from now (the time blocked
            # is not CPU time; `check_alive` leaves it out).
            set_deadline(context, host)
        return value

    host_call.__name__ = qualified
    return host_call


def build_linker(engine: wasmtime.Engine) -> wc.Linker:
    """A linker with WASI p2 and every `pie:inferlet` import, shared by all instances."""
    linker = wc.Linker(engine)
    linker.add_wasip2()
    with linker.root() as root:
        for interface, functions in FUNCTIONS.items():
            with root.add_instance(interface_name(interface)) as inst:
                for name, (fn, kind) in functions.items():
                    qualified = f"{interface}.{name}"
                    wasm_calls.add_function(inst, name, qualified, _wrap(qualified, fn, kind))
    return linker
