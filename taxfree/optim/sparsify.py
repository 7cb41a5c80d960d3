"""Fast exact sparsifiers: Bernoulli keep-masks from geometric gaps, top-k by magnitude.

Both return flat positions (int64, ascending for the Bernoulli one) instead of dense masks, so
the cost follows the number of kept entries, not the tensor size.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int | str) -> int:
    """A 63-bit seed from a few integers or strings (splitmix64 finaliser), stable across runs.

    Seeding a generator from (seed, step, ...) instead of carrying generator state makes every
    DDP rank draw the same masks and makes resume exact without saving RNG state.
    """
    h = 0x9E3779B97F4A7C15
    for value in values:
        if isinstance(value, str):
            value = zlib.crc32(value.encode("utf-8"))
        h = (h ^ (int(value) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def bernoulli_positions(
    n: int, keep: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """Ascending positions in [0, n) kept by i.i.d. Bernoulli(keep) draws.

    The gaps between kept positions of a Bernoulli(q) sequence are Geometric(q), so about q*n
    uniform draws (inverse CDF: floor(log(1-u)/log(1-q)) + 1) give exactly the same
    distribution as n coin flips.
    """
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if keep >= 1.0:
        return torch.arange(n, device=device)
    if keep <= 0.0:
        return torch.zeros(0, dtype=torch.long, device=device)
    log_miss = math.log1p(-keep)
    mean = n * keep
    chunk = int(mean + 6.0 * math.sqrt(mean * (1.0 - keep)) + 16)
    pieces: list[Tensor] = []
    end = -1  # last position drawn so far
    while end < n:
        u = torch.rand(chunk, generator=generator, dtype=torch.float64, device=device)
        gaps = torch.floor(torch.log1p(-u) / log_miss).to(torch.long).add_(1)
        positions = torch.cumsum(gaps, 0).add_(end)
        pieces.append(positions)
        end = int(positions[-1].item())
    positions = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    count = int(torch.searchsorted(positions, n).item())
    return positions[:count]


@functools.lru_cache(maxsize=64)
def _sample_index(n: int, size: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random sample positions per tensor size (drawn once, not every step)."""
    generator = torch.Generator(device=device).manual_seed(n)
    return torch.randint(n, (size,), generator=generator, device=device)


def topk_positions(magnitude: Tensor, k: int, sample_size: int = 65536) -> tuple[Tensor, Tensor]:
    """Flat positions of the k largest entries of a flat non-negative tensor, and the threshold.

    Exact by threshold: every entry >= the k-th largest value is kept (so exact ties at the
    threshold keep a few more than k; zeros among them add nothing to an update). Sorting (the
    authors' argsort) or a full selection costs many passes; here a fixed pseudo-random sample
    (65536 entries, or n/8) gives a lower bound that a few more than k entries exceed, one
    pass collects those candidates, and the exact selection runs on them only. If the bound
    was too high (rare) it falls back to kthvalue on the whole tensor: exact either way.
    """
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    sample_size = min(sample_size, n // 8)
    if sample_size >= 1024:
        sample = magnitude.index_select(0, _sample_index(n, sample_size, magnitude.device))
        fraction = k / n
        margin = 6.0 * math.sqrt(fraction * (1.0 - fraction) / sample_size) + 1.0 / sample_size
        above = min(sample_size, int(math.ceil((fraction + margin) * sample_size)))
        lower = torch.topk(sample, above, sorted=False).values.min()
        candidates = torch.nonzero(magnitude >= lower).squeeze(1)
        m = candidates.numel()
        if m >= k:
            values = magnitude.index_select(0, candidates)
            threshold = torch.kthvalue(values, m - k + 1).values
            return candidates[values >= threshold], threshold
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    return torch.nonzero(magnitude >= threshold).squeeze(1), threshold
