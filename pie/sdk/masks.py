"""Run-length encodings of the masks a forward pass takes.

The WIT carries masks as run lengths, alternating off/on and starting with off (a leading 0
when the first run is on), so a causal mask over a long context is two or three numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def runs(flags: Sequence[bool]) -> list[int]:
    """Run lengths of `flags` alternating False/True, starting with False."""
    out: list[int] = []
    current, count = False, 0
    for flag in flags:
        if bool(flag) == current:
            count += 1
        else:
            out.append(count)
            current, count = not current, 1
    out.append(count)
    return out


def allowed_tokens(tokens: Iterable[int], vocab_size: int) -> list[int]:
    """A logit mask (run lengths over the vocabulary) allowing only `tokens`."""
    allowed = sorted(set(tokens))
    out: list[int] = []
    at = 0
    for token in allowed:
        if not 0 <= token < vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {vocab_size})")
    i = 0
    while i < len(allowed):
        j = i
        while j + 1 < len(allowed) and allowed[j + 1] == allowed[j] + 1:
            j += 1
        out += [allowed[i] - at, allowed[j] - allowed[i] + 1]
        at = allowed[j] + 1
        i = j + 1
    if at < vocab_size:
        out.append(vocab_size - at)
    return out
