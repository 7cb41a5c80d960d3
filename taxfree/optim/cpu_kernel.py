"""The fused Adam pass of adam_kernel.c: built with gcc at first use, called through ctypes.

Why: on a CPU every step of the online merging optimizers must at least read g, m, v and write
m, v. torch's foreach ops do that in several passes over memory (lerp, mul, addcmul: 32 bytes
per parameter, then more to form D); one fused pass moves 20 and finds what the merge needs on
the way (D at OnDARE's kept positions, OnTIES's top-k candidates, the L1 norm of D). Measured
against torch's fused AdamW on the same CPU: docs/benchmarks.md.

The library is compiled once per source, compiler and CPU (cached under
$XDG_CACHE_HOME/taxfree/kernels, or TAXFREE_KERNEL_CACHE), needs only a C compiler (gcc or cc;
no torch headers, no Python headers), and takes a few seconds to build. Anything that stops it
(no compiler, a failed build, a self-check that disagrees with torch's arithmetic) leaves
`kernel()` None and the optimizers on their torch path; TAXFREE_CPU_KERNEL=0 turns it off.
Large tensors are split over threads (ctypes releases the GIL), as many as torch uses.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from taxfree.optim.adamw_math import AdamCoefficients

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("adam_kernel.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
CHUNK = 1 << 21  # entries per thread task: big enough to amortise the hand-off


class _Coefficients(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in ("w1", "b2", "c2", "decay", "step", "bc2", "eps")]


class AdamKernel:
    """The loaded library; every tensor argument must be a contiguous fp32 CPU tensor."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        coef = ctypes.POINTER(_Coefficients)
        lib.tf_adam_update.argtypes = [p, p, p, p, i64, coef, p, p]
        lib.tf_adam_update.restype = None
        lib.tf_adam_update_collect.argtypes = [p, p, p, p, i64, coef, f32, p, p, i64, p]
        lib.tf_adam_update_collect.restype = i64
        lib.tf_adam_at.argtypes = [p, p, p, i64, coef, p]
        lib.tf_adam_at.restype = None
        lib.tf_adam_peek.argtypes = [p, p, p, p, i64, coef, p]
        lib.tf_adam_peek.restype = None
        lib.tf_adam_dense_abs.argtypes = [p, p, i64, coef, p]
        lib.tf_adam_dense_abs.restype = None
        lib.tf_adam_update_apply.argtypes = [p, p, p, p, i64, coef, p, i64, f32, f32, p, p, i64, f32, p]
        lib.tf_adam_update_apply.restype = None
        lib.tf_ties_apply.argtypes = [p, p, p, i64, p, p, i64, f32, f32, ctypes.c_int, f32, f32]
        lib.tf_ties_apply.restype = None
        lib.tf_kth_largest.argtypes = [p, i64, i64, p]
        lib.tf_kth_largest.restype = f32
        lib.tf_take_top_k.argtypes = [p, i64, i64, p, p]
        lib.tf_take_top_k.restype = None
        self.lib = lib
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    # ----- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _coef(c: AdamCoefficients) -> _Coefficients:
        return _Coefficients(c.w1, c.b2, c.c2, c.decay, c.step_size, c.bc2_sqrt, c.eps)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        threads = torch.get_num_threads()
        if threads <= 1 or n < 2 * CHUNK:
            return [(0, n)]
        size = max(CHUNK, -(-n // (4 * threads)))
        return [(a, min(n, a + size)) for a in range(0, n, size)]

    def _map(self, fn, chunks):
        if len(chunks) == 1:
            return [fn(*chunks[0])]
        threads = torch.get_num_threads()
        if self._pool is None or self._pool_size != threads:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="taxfree-adam")
            self._pool_size = threads
        return list(self._pool.map(lambda ab: fn(*ab), chunks))

    # ----- the passes ------------------------------------------------------------------------

    def update(self, p: Tensor | None, g: Tensor, m: Tensor, v: Tensor, c: AdamCoefficients,
               d_out: Tensor | None = None, l1: bool = False) -> float | None:
        """Decay p, update m and v in place; D into d_out; returns sum |D| when l1."""
        coef = self._coef(c)
        n = m.numel()
        size = 4

        def run(a: int, b: int) -> float:
            total = ctypes.c_double(0.0)
            at = lambda t: None if t is None else t.data_ptr() + a * size  # noqa: E731
            self.lib.tf_adam_update(at(p), at(g), at(m), at(v), b - a, ctypes.byref(coef), at(d_out),
                                    ctypes.byref(total) if l1 else None)
            return total.value

        sums = self._map(run, self._chunks(n))
        return sum(sums) if l1 else None

    def update_collect(self, p: Tensor | None, g: Tensor, m: Tensor, v: Tensor,
                       c: AdamCoefficients, lower: float, limit: int,
                       l1: bool = False) -> tuple[Tensor, Tensor, float | None, bool]:
        """Decay p, update m and v in place, and collect the entries with |D| >= lower:
        (ascending positions, D there, sum |D| over all entries when l1, complete). Output room
        is for about `limit` entries (shared out over the threads' chunks); when more reach
        `lower`, complete is False and the positions are not usable (the moments are updated
        all the same: select on `dense_abs` then)."""
        coef = self._coef(c)
        n = m.numel()
        chunks = self._chunks(n)

        def run(a: int, b: int):
            room = min(b - a, -(-limit * (b - a) // n) + 1024)
            idx = torch.empty(room, dtype=torch.int64)
            values = torch.empty(room, dtype=torch.float32)
            total = ctypes.c_double(0.0)
            at = lambda t: None if t is None else t.data_ptr() + a * 4  # noqa: E731
            count = self.lib.tf_adam_update_collect(
                at(p), at(g), at(m), at(v), b - a, ctypes.byref(coef), lower, idx.data_ptr(),
                values.data_ptr(), room, ctypes.byref(total) if l1 else None,
            )
            return idx[: min(count, room)].add_(a), values[: min(count, room)], total.value, count <= room

        parts = self._map(run, chunks)
        index = torch.cat([x[0] for x in parts]) if len(parts) > 1 else parts[0][0]
        values = torch.cat([x[1] for x in parts]) if len(parts) > 1 else parts[0][1]
        return index, values, (sum(x[2] for x in parts) if l1 else None), all(x[3] for x in parts)

    def at(self, m: Tensor, v: Tensor, index: Tensor, c: AdamCoefficients) -> Tensor:
        """D at the int64 positions `index` of moments already updated."""
        index = index.contiguous()
        out = torch.empty(index.numel(), dtype=torch.float32)
        self.lib.tf_adam_at(m.data_ptr(), v.data_ptr(), index.data_ptr(), index.numel(),
                            ctypes.byref(self._coef(c)), out.data_ptr())
        return out

    def dense_abs(self, m: Tensor, v: Tensor, c: AdamCoefficients, out: Tensor) -> Tensor:
        """|D| of every entry of moments already updated, into `out`."""
        coef = self._coef(c)

        def run(a: int, b: int) -> None:
            self.lib.tf_adam_dense_abs(m.data_ptr() + 4 * a, v.data_ptr() + 4 * a, b - a,
                                       ctypes.byref(coef), out.data_ptr() + 4 * a)

        self._map(run, self._chunks(m.numel()))
        return out

    def update_apply(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: AdamCoefficients,
                     kept: Tensor, q: float, weight: float, tau_index: Tensor | None = None,
                     tau_value: Tensor | None = None, alpha: float = 0.0) -> None:
        """OnDARE's step in one pass: decay, moments, p[kept] += weight * (D / q) (kept: int64,
        ascending), then p[tau_index] += alpha * tau_value (int32, ascending; fp32)."""
        coef = self._coef(c)
        chunks = self._chunks(m.numel())
        if tau_index is None:
            tau_index = torch.zeros(0, dtype=torch.int32)
            tau_value = torch.zeros(0, dtype=torch.float32)
        starts = torch.tensor([a for a, _ in chunks] + [m.numel()])
        kcut = torch.searchsorted(kept, starts).tolist()
        tcut = torch.searchsorted(tau_index, starts.to(tau_index.dtype)).tolist()

        def run(ci: int, _: int) -> None:
            a, b = chunks[ci]
            # the chunk's arrays start at entry a: its positions are shifted by a
            k = kept[kcut[ci] : kcut[ci + 1]] - a if a else kept[kcut[ci] : kcut[ci + 1]]
            t = tau_index[tcut[ci] : tcut[ci + 1]] - a if a else tau_index[tcut[ci] : tcut[ci + 1]]
            room = torch.empty(k.numel(), dtype=torch.float32)  # D at the kept positions
            self.lib.tf_adam_update_apply(
                p.data_ptr() + 4 * a, g.data_ptr() + 4 * a, m.data_ptr() + 4 * a, v.data_ptr() + 4 * a,
                b - a, ctypes.byref(coef), k.data_ptr(), k.numel(), q, weight, t.data_ptr(),
                tau_value.data_ptr() + 4 * tcut[ci], t.numel(), alpha, room.data_ptr(),
            )

        self._map(run, [(i, i) for i in range(len(chunks))])

    def ties_apply(self, p: Tensor, kept: Tensor, values: Tensor, tau_index: Tensor,
                   tau_value: Tensor, update_weight: float, tau_weight: float, weighted: bool,
                   alpha: float) -> None:
        """OnTIES's election and update at the union of kept (int64, ascending; D_k there) and
        tau's positions (int32, ascending; fp32 values)."""
        self.lib.tf_ties_apply(
            p.data_ptr(), kept.data_ptr(), values.data_ptr(), kept.numel(), tau_index.data_ptr(),
            tau_value.data_ptr(), tau_index.numel(), update_weight, tau_weight, int(weighted),
            alpha, 1.0 - alpha,
        )

    def kth_largest(self, values: Tensor, k: int) -> float:
        """The k-th largest of a flat fp32 tensor (quickselect; NaN counts as +inf)."""
        work = torch.empty(2 * values.numel(), dtype=torch.float32)
        return self.lib.tf_kth_largest(values.data_ptr(), values.numel(), k, work.data_ptr())

    def take_top_k(self, values: Tensor, k: int) -> Tensor:
        """`sparsify.take_top_k` of a flat non-negative fp32 tensor: exactly k positions."""
        work = torch.empty(2 * values.numel(), dtype=torch.float32)
        out = torch.empty(k, dtype=torch.int64)
        self.lib.tf_take_top_k(values.data_ptr(), values.numel(), k, work.data_ptr(), out.data_ptr())
        return out

    def peek(self, g: Tensor, m: Tensor, v: Tensor, index: Tensor, c: AdamCoefficients) -> Tensor:
        """|D| at the int64 positions `index` as the next update will make it (nothing written)."""
        index = index.contiguous()
        out = torch.empty(index.numel(), dtype=torch.float32)
        self.lib.tf_adam_peek(g.data_ptr(), m.data_ptr(), v.data_ptr(), index.data_ptr(), index.numel(),
                              ctypes.byref(self._coef(c)), out.data_ptr())
        return out


def usable(*tensors: Tensor | None) -> bool:
    """The kernel takes these: contiguous fp32 CPU tensors (None allowed)."""
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
        for t in tensors
    )


def _cache_dir() -> Path:
    root = os.environ.get("TAXFREE_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taxfree" / "kernels"


def _cpu_signature() -> str:
    """What the -march=native build depends on: a library built on one CPU must not be loaded
    on another from a shared home directory."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(compiler: str, native: bool = True) -> Path:
    """The compiled library for this source, compiler and CPU (built once, then cached).
    native: tuned for this CPU (-march=native: AVX-512 where there is one); else the compiler's
    generic target (tests compare the two)."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    attempts = [FLAGS + ["-march=native"], FLAGS] if native else [FLAGS]
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_signature().encode(),
                                     " ".join(FLAGS).encode(), str(native).encode()])).hexdigest()[:16]
    target = _cache_dir() / f"adam_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in attempts:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        result = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            os.replace(tmp, target)  # atomic: ranks building at once each leave a whole file
            return target
        os.unlink(tmp)
        errors.append(result.stderr.strip()[-500:])
    raise RuntimeError("; ".join(errors))


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _self_check(k: AdamKernel) -> None:
    """The kernel's moments and D against torch's ops on a few hundred entries (within an ulp:
    torch's sqrt is not always correctly rounded)."""
    g = torch.Generator().manual_seed(0)
    n = 301  # a vector body and a scalar tail
    grad = torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    p = torch.randn(n, generator=g)
    c = AdamCoefficients(-1e-3 / 0.19, (1 - 0.999**2) ** 0.5, 1e-8, w1=0.1, b2=0.999, c2=1e-3, decay=0.999)
    mt, vt, pt = m.clone().lerp_(grad, 0.1), v.clone().mul_(0.999).addcmul_(grad, grad, value=1e-3), p * 0.999
    dt = (mt * c.step_size) / (vt.sqrt() / c.bc2_sqrt + c.eps)
    d = torch.empty(n)
    k.update(p, grad, m, v, c, d_out=d)
    for got, want in ((m, mt), (v, vt), (p, pt), (d, dt)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def kernel() -> AdamKernel | None:
    """The fused pass, or None (then the optimizers use torch ops). TAXFREE_CPU_KERNEL=0 is read
    at every call, so a process can switch it off (or a test compare both paths)."""
    if os.environ.get("TAXFREE_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return _load()


@functools.lru_cache(maxsize=1)
def _load() -> AdamKernel | None:
    cc = compiler()
    if not cc:
        log.info("no C compiler: the online merging optimizers use torch ops on the CPU")
        return None
    try:
        k = AdamKernel(ctypes.CDLL(str(build(cc))))
        _self_check(k)
    except Exception as exc:  # any failure means: use torch ops
        log.warning("the fused CPU Adam pass is unavailable (%s): using torch ops", str(exc)[:300])
        return None
    return k
