"""`PrefillPacer`: how many prefill tokens may share a step with decoders, from measured time.

A step's time grows with its tokens, so a long prompt chunked by a token budget alone (512
tokens: ~0.5-1 s on a CPU) makes every decoder in the same steps wait that long per token
(measured: a canary's token waited 6-17 s beside an 8,192-token prompt). The pacer keeps two
running averages, the time of a step of decodes only and the time one prefill token adds, and
lets a step that carries decodes take only the tokens of long prompts (`plan_batch`'s
`long_prompt`) that keep it within `latency_factor` times a decode-only step. Steps with no
decoders are not paced: the prompt then goes at the token budget's full speed. The floor: a
step with any prompt tokens at depth d also reads that prompt's KV prefix (SmolLM2: 46 KB a
token, ~10 ms at 4,096 on a 2-core CPU, as long as a decode step), so one token a step is the
least a paced prompt costs its neighbours.

It needs a decode-only step to measure: when it has none (at first, and every
`REFRESH_STEPS` paced steps, since the decoders come and go) the next step with decodes
carries no prefill. Pacing holds while decoders are active (a decode ran in the last
`ACTIVE_S` seconds), not only in steps that carry one: a decoder between two tokens (its
program turning the last one around, slower on a loaded machine) must not come back to a step
of 512 prompt tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# A step with decodes stays within this many times a decode-only step. The decoders' tokens
# come a little later than their step ends (their programs turn them around), so for their
# latency to stay within 2x of decoding alone, steps aim lower (bench.isolation).
DECODE_LATENCY_FACTOR = 1.25
# Only prompts longer than this many steps' token budget are paced. A shorter one delays the
# decoders a few steps, once; pacing those too starved a serving load (measured at 16
# concurrent chat requests of ~256-token prompts: time to first token p50 1.3 -> 22 s, output
# 131 -> 71 tokens/s).
LONG_PROMPT_STEPS = 4
ALPHA = 0.25  # weight of the newest step in the running averages
REFRESH_STEPS = 32  # paced steps between two decode-only steps that re-measure the baseline
PROBE_TOKENS = 16  # prefill tokens of the first paced step, before a token's cost is known
ACTIVE_S = 0.5  # decoders count as active this long after their last decode


@dataclass(slots=True)
class PrefillPacer:
    latency_factor: float | None = DECODE_LATENCY_FACTOR  # None: no pacing (the token budget alone)
    decode_step_s: float | None = None  # a step of decodes only
    token_s: float | None = None  # what one more prefill token adds to a step
    paced_steps: int = 0  # since the last decode-only step
    last_decode: float = float("-inf")  # when the last step that carried a decode ended

    def pacing(self, now: float | None = None) -> bool:
        """Whether decoders are active, so prompt tokens go at the pace (and a step is not
        "full" of them: the scheduler still gathers its decoders)."""
        now = time.monotonic() if now is None else now
        return self.latency_factor is not None and now - self.last_decode < ACTIVE_S

    def prefill_tokens(self, decodes_waiting: bool, now: float | None = None) -> int | None:
        """Prefill tokens the next step may carry (beside the decodes waiting, if any); None:
        no limit (no decoder is active, or pacing is off)."""
        if self.latency_factor is None or not (decodes_waiting or self.pacing(now)):
            return None
        refresh = self.decode_step_s is None or self.paced_steps >= REFRESH_STEPS
        if refresh and decodes_waiting:
            return 0
        if self.decode_step_s is None or self.token_s is None:
            return PROBE_TOKENS
        spare = (self.latency_factor - 1.0) * self.decode_step_s
        return max(1, int(spare / max(self.token_s, 1e-6)))

    def observe(self, decodes: int, prefill: int, seconds: float, now: float | None = None) -> None:
        """A step ran `decodes` decode chunks and `prefill` prefill tokens in `seconds`."""
        if decodes:
            self.last_decode = time.monotonic() if now is None else now
        if prefill == 0:
            if decodes:
                self.decode_step_s = _mix(self.decode_step_s, seconds)
                self.paced_steps = 0
            return
        base = self.decode_step_s if decodes and self.decode_step_s is not None else 0.0
        self.token_s = _mix(self.token_s, max(seconds - base, 0.0) / prefill)
        if decodes:
            self.paced_steps += 1


def _mix(average: float | None, value: float) -> float:
    return value if average is None else (1 - ALPHA) * average + ALPHA * value
