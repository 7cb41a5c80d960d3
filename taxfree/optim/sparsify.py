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


def take_top_k(values: Tensor, k: int) -> Tensor:
    """Positions (ascending) of exactly k entries of a flat non-negative tensor: every entry above
    the k-th largest value, then the entries equal to it from the lowest position up.

    The tie rule is what makes "top k" exactly k: at Adam's first step |D| = lr*|g|/(|g|+eps) is
    nearly constant, and "keep everything >= the k-th largest" kept up to 9x k entries.
    """
    n = values.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    if k == n:
        return torch.arange(n, device=values.device)
    threshold = torch.kthvalue(values, n - k + 1).values
    return keep_above_and_ties(values, threshold, k - int((values > threshold).sum().item()))


def keep_above_and_ties(values: Tensor, threshold: Tensor, ties: int) -> Tensor:
    """Positions (ascending) of the entries above `threshold` plus the first `ties` entries equal
    to it (the lowest positions)."""
    keep = values > threshold
    if ties > 0:
        equal = torch.nonzero(values == threshold).squeeze(1)[:ties]
        keep.index_fill_(0, equal, True)
    return torch.nonzero(keep).squeeze(1)


@functools.lru_cache(maxsize=64)
def _sample_index(n: int, size: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random sample positions per tensor size (drawn once, not every step)."""
    generator = torch.Generator(device=device).manual_seed(n)
    return torch.randint(n, (size,), generator=generator, device=device)


def sample_size_for(n: int, sample_size: int = 65536) -> int:
    """Entries sampled to bound the top-k threshold of n entries (0: select on all of them)."""
    size = min(sample_size, n // 8)
    return size if size >= 1024 else 0


def sample_positions(n: int, sample_size: int, device: torch.device | str) -> Tensor:
    return _sample_index(n, sample_size, torch.device(device))


def lower_bound_from_sample(sample: Tensor, n: int, k: int) -> Tensor:
    """A value that, with overwhelming probability, at least k of the n entries reach: the
    sample's quantile at k/n plus a 6-sigma margin (so about 1.2k entries at k = n/100)."""
    size = sample.numel()
    fraction = k / n
    margin = 6.0 * math.sqrt(fraction * (1.0 - fraction) / size) + 1.0 / size
    above = min(size, int(math.ceil((fraction + margin) * size)))
    return torch.topk(sample, above, sorted=False).values.min()


def topk_positions(magnitude: Tensor, k: int, sample_size: int = 65536) -> Tensor:
    """Flat positions (ascending) of exactly the k largest entries of a flat non-negative tensor,
    ties at the k-th largest value broken by lowest position (`take_top_k`).

    Sorting (the authors' argsort) or a full selection costs many passes; here a fixed
    pseudo-random sample (65536 entries, or n/8) gives a lower bound that a few more than k
    entries reach, one pass collects those candidates, and the exact selection runs on them
    only (candidates keep their order, so the tie rule is unchanged). If the bound was too high
    (rare) the selection runs on the whole tensor: exact either way.
    """
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    size = sample_size_for(n, sample_size)
    if size:
        sample = magnitude.index_select(0, sample_positions(n, size, magnitude.device))
        lower = lower_bound_from_sample(sample, n, k)
        candidates = torch.nonzero(magnitude >= lower).squeeze(1)
        if candidates.numel() >= k:
            return candidates[take_top_k(magnitude.index_select(0, candidates), k)]
    return take_top_k(magnitude, k)
