"""Automatic prefix caching: full KV pages kept by the tokens that made them, for reuse.

A page of `page_size` slots is named by a hash chain over the tokens: page i's key hashes page
i-1's key with page i's tokens, so one key stands for the whole prefix up to it. The cache
holds one reference on each page it keeps (as the pool owner CACHE_OWNER), so a page outlives
the context that wrote it. A new context whose first forward starts with a cached prefix
adopts those pages instead of computing them (`BatchScheduler._admit`); a forward that ran
offers its context's new full pages (`offer`). Only contexts whose every token went in with
default positions and no masks are offered or served: their tokens are the host's own record
(`KvContext.tokens`), never what a program claims, so one program cannot poison another's KV.

When the pool runs short, pages only the cache still holds are given back, least recently used
first and a chain's later pages before its earlier ones (`evict`, the pool's reclaim hook).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pie.control.context import ContextManager
from pie.control.forward import ForwardRequest
from pie.control.page_pool import OwnerId, PagePool

CACHE_OWNER: OwnerId = -2  # the pool owner under which the cache holds its pages


@dataclass(frozen=True, slots=True)
class CacheStats:
    pages: int  # pages the cache holds now
    queried_tokens: int  # prompt tokens looked up (that could have hit)
    hit_tokens: int  # of them, served from the cache
    evicted_pages: int


class PrefixCache:
    """Thread-safe. `lookup` runs on the thread that submits a forward, `offer` on the engine
    thread after a step, `evict` wherever an allocation falls short."""

    def __init__(self, pool: PagePool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self._lock = threading.Lock()
        self._pages: OrderedDict[bytes, int] = OrderedDict()  # key -> page; last = most recent
        self._queried = self._hits = self._evicted = 0

    def keys(self, tokens: list[int], pages: int, start: int = 0, prev: bytes = b"") -> list[bytes]:
        """Keys of pages start .. pages-1 of `tokens` (`prev`: the key of page start-1)."""
        out = []
        ps = self.page_size
        for i in range(start, pages):
            chunk = np.asarray(tokens[i * ps : (i + 1) * ps], dtype=np.uint32).tobytes()
            prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
            out.append(prev)
        return out

    def lookup(
        self, owner: OwnerId, tokens: list[int], max_pages: int
    ) -> tuple[list[int], list[bytes]]:
        """The cached pages of the longest prefix of `tokens` (at most `max_pages` pages), with
        one reference each taken for `owner`, and their keys; empty if none."""
        found: list[int] = []
        keys: list[bytes] = []
        with self._lock:
            self._queried += max_pages * self.page_size
            for key in self.keys(tokens, max_pages):
                page = self._pages.get(key)
                if page is None:
                    break
                found.append(page)
                keys.append(key)
            if found:
                self.pool.retain(owner, found)
                self._touch(keys)
                self._hits += len(found) * self.page_size
        return found, keys

    def offer(self, tokens: list[int], pages: list[int], known: list[bytes]) -> list[bytes]:
        """Keeps the full pages of a context whose slots hold `tokens` (`pages` covers them,
        `known` are the keys of its first pages, already offered); returns the new keys."""
        full = min(len(tokens) // self.page_size, len(pages))
        if full <= len(known):
            return []
        keys = self.keys(tokens, full, len(known), known[-1] if known else b"")
        with self._lock:
            for key, page in zip(keys, pages[len(known) : full], strict=True):
                if key not in self._pages:
                    self.pool.retain(CACHE_OWNER, [page])
                    self._pages[key] = page
            self._touch(keys)
        return keys

    def evict(self, pages: int) -> int:
        """Gives back up to `pages` pages only the cache holds, least recently used first;
        returns how many it freed."""
        freed: list[int] = []
        with self._lock:
            for key, page in list(self._pages.items()):
                if len(freed) >= pages:
                    break
                if self.pool.refcount(page) == 1:  # nobody but the cache reads it
                    del self._pages[key]
                    freed.append(page)
            if freed:
                self.pool.release(CACHE_OWNER, freed)
                self._evicted += len(freed)
        return len(freed)

    def clear(self) -> None:
        """Drops every page the cache holds (pages others still read stay theirs)."""
        with self._lock:
            pages, self._pages = list(self._pages.values()), OrderedDict()
            if pages:
                self.pool.release(CACHE_OWNER, pages)

    def reusable(self) -> int:
        """Pages only the cache holds: free for the asking (`evict`)."""
        with self._lock:
            return sum(1 for page in self._pages.values() if self.pool.refcount(page) == 1)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._pages), self._queried, self._hits, self._evicted)

    def _touch(self, keys: list[bytes]) -> None:
        """Marks a chain used (lock held); its first page ends most recent, so eviction takes
        a chain's later pages before the earlier ones the later ones need."""
        for key in reversed(keys):
            if key in self._pages:
                self._pages.move_to_end(key)


def served(cache: PrefixCache, contexts: ContextManager, request: ForwardRequest) -> ForwardRequest:
    """`request` on an empty context, its longest cached prefix adopted (whole pages, short of
    its first output and its last token): the request for the rest. `request` itself when
    nothing is cached or it does not append plainly (positions, a mask)."""
    ctx, tokens = request.context, request.tokens
    if ctx.length or ctx.pages or ctx.tokens != [] or not plain(request):
        return request
    first_output = min((i for i, _ in request.outputs), default=len(tokens) - 1)
    max_pages = min(first_output, len(tokens) - 1) // cache.page_size
    if max_pages <= 0:
        return request
    pages, keys = cache.lookup(ctx.owner, tokens, max_pages)
    if not pages:
        return request
    covered = len(pages) * cache.page_size
    try:
        contexts.adopt(ctx, pages, tokens[:covered], keys)
    except BaseException:
        cache.pool.release(ctx.owner, pages)
        raise
    return dataclasses.replace(
        request,
        tokens=tokens[covered:],
        outputs=[(i - covered, spec) for i, spec in request.outputs],
    )


def plain(request: ForwardRequest) -> bool:
    """Whether the request appends its tokens at the next positions, attending causally."""
    return request.positions is None and request.attention_mask is None
