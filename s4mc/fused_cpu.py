"""The fused CPU kernel of the paper-default pseudo-labelling call: build, cache, load and call it.

s4mc/kernels/fused_pl.c computes label, keep and the pl/* statistics in one pass over the teacher
probabilities, with the eager path's bits (docs/performance.md, "The fused CPU kernel"); where the
compiler targets AVX-512 it takes its intrinsics body (kernels/fused_pl_avx512.h), elsewhere a portable
one. It is plain C called through ctypes on the tensors' memory, so it needs a C compiler once per
machine and no Python headers: the first use compiles it with ``$CC`` (default ``cc``; ~0.5 s with
loading) into ``$S4MC_KERNEL_CACHE`` (default ``~/.cache/s4mc/kernels``), under a name that hashes the
sources, the compiler's version and the CPU's feature flags (it is built with ``-march=native``, so a
cluster of mixed machines builds one per kind). Concurrent processes (Ray actors) each build to a
private file and rename it into place, so none ever loads a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels") / "fused_pl.c"
SOURCES = (SOURCE, SOURCE.with_name("fused_pl_avx512.h"))  # the second is included by the first
# -ffp-contract=off: p + m - p m is rounded as three operations, as PyTorch rounds it (no FMA), which
# the bit-for-bit equality needs. -march=native selects the AVX-512 body where the CPU has it; no flag
# here is x86-only, so aarch64 compilers build the portable body.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
KINDS = {"max": 0, "margin": 1}  # confidence kinds the kernel computes; entropy stays eager


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message names the compiler and the reason."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("S4MC_KERNEL_CACHE", Path.home() / ".cache" / "s4mc" / "kernels"))


@functools.lru_cache(maxsize=4)
def load(compiler: str | None = None, portable: bool = False) -> ctypes.CDLL:
    """The compiled kernel (built on first use, then taken from the cache); KernelUnavailable if not.

    ``portable`` builds the plain-C body even where the CPU has AVX-512, so the tests check both."""
    cc = compiler or os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise KernelUnavailable(f"C compiler {cc!r} not found on PATH (set CC to one)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = (*FLAGS, "-DS4MC_PORTABLE") if portable else FLAGS
    key = hashlib.sha256("\0".join([*(f.read_text() for f in SOURCES), cc, version, *flags, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fused_pl-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        except OSError as e:
            raise KernelUnavailable(f"kernel cache {target.parent} is not writable ({e}); set S4MC_KERNEL_CACHE") from e
        os.close(fd)
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise KernelUnavailable(f"{cc} failed on {SOURCE}: {proc.stderr.strip()[:400]}")
        os.replace(tmp, target)  # atomic: a concurrent process sees no file or a whole one
    lib = ctypes.CDLL(str(target))
    fn = lib.s4mc_fused_pseudo_label
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [vp, vp, vp, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_float,
                   ctypes.c_int, i64, vp, vp, vp, vp, vp, vp, vp]
    fn.restype = ctypes.c_int
    lib.s4mc_fused_scratch_floats.argtypes = [i64, i64, i64, i64]
    lib.s4mc_fused_scratch_floats.restype = i64
    lib.s4mc_fused_variant.restype = ctypes.c_int
    return lib


class FusedPseudoLabel:
    """Callable over one labeler's shapes; keeps its scratch memory between calls (one thread at a time).

    ``phase_s`` holds the last call's seconds in the scan, the DPA selection and the counting;
    ``variant`` names the body that was compiled ("avx512" or "portable").
    """

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self._shape: tuple[int, ...] | None = None
        self.phase_s = torch.zeros(3, dtype=torch.float64)
        self.variant = "avx512" if lib.s4mc_fused_variant() == 512 else "portable"

    def __call__(self, probs: Tensor, valid: Tensor, gt: Tensor | None, *, kind: str, alpha: float | None,
                 gamma_fixed: float, refine_enabled: bool, ignore_index: int
                 ) -> tuple[Tensor, Tensor, list[Tensor]] | None:
        """(label, keep, [quantity, quality, quantity_no_refine, quality_no_refine, threshold]) for CPU
        float32 ``probs``; DPA with ``alpha`` unless it is None, else ``gamma_fixed``. None when some
        probability is outside [+0, 1] (-0.0 and NaN included): the caller then computes the call eagerly."""
        B, C, H, W = probs.shape
        if self._shape != (B, C, H, W):
            # The kernel says how much it needs (row buffers and the selection's keys; fused_pl.c).
            self.scratch = torch.empty(int(self.lib.s4mc_fused_scratch_floats(B, C, H, W)))
            self.kappa_raw, self.kappa_ref = torch.empty((B, H, W)), torch.empty((B, H, W))  # internal only
            self._shape = (B, C, H, W)
        probs, valid = probs.contiguous(), valid.contiguous()
        gt = None if gt is None else gt.to(torch.int64).contiguous()
        label = torch.empty((B, H, W), dtype=torch.int64)
        keep = torch.empty((B, H, W), dtype=torch.bool)
        stats = torch.empty(5)
        # argtypes (set in load) convert: gamma_fixed is rounded to float32 as torch.full rounds it.
        status = self.lib.s4mc_fused_pseudo_label(
            probs.data_ptr(), valid.data_ptr(), None if gt is None else gt.data_ptr(), B, C, H, W,
            KINDS[kind], int(alpha is not None), 0.0 if alpha is None else alpha, gamma_fixed,
            int(refine_enabled), ignore_index, label.data_ptr(), keep.data_ptr(), self.kappa_raw.data_ptr(),
            self.kappa_ref.data_ptr(), stats.data_ptr(), self.phase_s.data_ptr(), self.scratch.data_ptr())
        if status != 0:
            return None
        return label, keep, list(stats.unbind())
