"""Fast exact sparsifiers: Bernoulli keep-masks from geometric gaps, top-k by magnitude.

Both return flat positions (int64, ascending) instead of dense masks, so the cost follows the
number of kept entries, not the tensor size.
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
        gaps = u.neg_().log1p_().div_(log_miss).floor_().to(torch.long).add_(1)  # in place: no temporaries
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
    kern = _cpu_kernel(values)
    if kern is not None:  # one quickselect and two passes in C
        return kern.take_top_k(values, k)
    if n > _LARGE and values.dtype == torch.float32:
        threshold = radix_kth_largest(values, k)  # kthvalue would copy n values and n indices
    else:
        threshold = torch.kthvalue(values, n - k + 1).values
    return keep_above_and_ties(values, threshold, k - int(torch.count_nonzero(values > threshold).item()))


_LARGE = 1 << 20


def _cpu_kernel(values: Tensor):
    """The compiled selection of taxfree.optim.cpu_kernel for a flat fp32 CPU tensor, or None."""
    if values.device.type != "cpu" or values.dtype != torch.float32 or not values.is_contiguous():
        return None
    from taxfree.optim import cpu_kernel

    return cpu_kernel.kernel()


def radix_kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of a flat non-negative fp32 tensor, exactly: non-negative floats order
    like their bits read as int32, so the bits are fixed a byte at a time from the top (four
    bincounts, each over the entries still matching the fixed bytes)."""
    candidates = values.contiguous().view(torch.int32)
    prefix, need = 0, k
    for shift in (24, 16, 8, 0):
        digits = (candidates >> shift) & 255
        counts = torch.bincount(digits, minlength=256).tolist()
        above = 0
        for byte in range(255, -1, -1):
            if above + counts[byte] >= need:
                break
            above += counts[byte]
        need -= above
        prefix |= byte << shift
        candidates = candidates[digits == byte]
    return torch.tensor([prefix], dtype=torch.int32, device=values.device).view(torch.float32)[0]


def keep_above_and_ties(values: Tensor, threshold: Tensor, ties: int) -> Tensor:
    """Positions (ascending) of the entries above `threshold` plus the first `ties` entries equal
    to it (the lowest positions). The ties are looked for a slice at a time, so a tensor tied
    almost everywhere costs no index of all its ties."""
    keep = values > threshold
    step = _LARGE
    start, n = 0, values.numel()
    while ties > 0 and start < n:
        equal = torch.nonzero(values[start : start + step] == threshold).squeeze(1)[:ties]
        keep.index_fill_(0, equal + start, True)
        ties -= equal.numel()
        start += step
    return torch.nonzero(keep).squeeze(1)


@functools.lru_cache(maxsize=64)
def _sample_index(n: int, size: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random sample positions per tensor size (drawn once, not every step)."""
    generator = torch.Generator(device=device).manual_seed(n)
    # ascending: reading the sample then walks memory forward (a sort once, not every step)
    return torch.randint(n, (size,), generator=generator, device=device).sort().values


SAMPLE_SIZE = 4096


def sample_size_for(n: int, sample_size: int = SAMPLE_SIZE) -> int:
    """Entries sampled to bound the top-k threshold of n entries (0: select on all of them)."""
    size = min(sample_size, n // 8)
    return size if size >= 1024 else 0


def sample_positions(n: int, sample_size: int, device: torch.device | str) -> Tensor:
    return _sample_index(n, sample_size, torch.device(device))


def lower_bound_from_sample(sample: Tensor, n: int, k: int) -> tuple[float, int]:
    """(bound, expected): a value that, with overwhelming probability, at least k of the n
    entries reach (the sample's quantile at k/n plus a 5-sigma margin), and about how many of
    the n entries reach it (1.8k at k = n/100 from 4096 samples). Heavy ties can make far more
    reach it. A small sample is the point: reading it costs a cache miss per entry, while the
    extra candidates cost about nothing."""
    size = sample.numel()
    fraction = k / n
    margin = 5.0 * math.sqrt(fraction * (1.0 - fraction) / size) + 1.0 / size
    above = min(size, int(math.ceil((fraction + margin) * size)))
    kern = _cpu_kernel(sample)
    if kern is not None:
        bound = kern.kth_largest(sample, above)
    else:
        bound = torch.kthvalue(sample, size - above + 1).values.item()
    return bound, int(math.ceil((fraction + margin) * n))


def candidate_limit(expected: int) -> int:
    """More candidates than this means |D| is heavily tied around the bound: select on the
    dense tensor instead of gathering them."""
    return 2 * expected + 4096


def topk_positions(magnitude: Tensor, k: int, sample_size: int = SAMPLE_SIZE) -> Tensor:
    """Flat positions (ascending) of exactly the k largest entries of a flat non-negative tensor,
    ties at the k-th largest value broken by lowest position (`take_top_k`).

    Sorting (the authors' argsort) or a full selection costs many passes; here a fixed
    pseudo-random sample (4096 entries, or n/8) gives a lower bound that somewhat more than k
    entries reach, one pass collects those candidates, and the exact selection runs on them
    only (candidates keep their order, so the tie rule is unchanged). If the bound was too high,
    or heavy ties let far more than expected reach it, the selection runs on the whole tensor:
    exact either way.
    """
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    size = sample_size_for(n, sample_size)
    if size:
        sample = magnitude.index_select(0, sample_positions(n, size, magnitude.device))
        lower, expected = lower_bound_from_sample(sample, n, k)
        reach = magnitude >= lower
        count = int(torch.count_nonzero(reach).item())
        if k <= count <= candidate_limit(expected):
            candidates = torch.nonzero(reach).squeeze(1)
            return candidates[take_top_k(magnitude.index_select(0, candidates), k)]
    return take_top_k(magnitude, k)
