"""Optional native (C) kernels, compiled on first use with the machine's C compiler.

The kernels are fast paths beside PyTorch code that computes the same thing: when there is no
compiler, the build fails, the tensors are not on the CPU, or ``YOCO_NATIVE=0`` is set, ``library()``
returns None and the callers take the PyTorch path (tests compare the two). The shared library is
built once per source text, compiler and flags into ``$YOCO_CACHE_DIR`` (default
``~/.cache/yoco/native``), written under a temporary name and renamed, so concurrent first uses never
load a half-written file. ``-march=native``: the library is built on, and for, the machine that runs it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
# One shared library from these sources (and the headers they include, whose text is part of its key).
SOURCES = (CSRC / "decode_attention.c", CSRC / "window_attention.c")
HEADERS = (CSRC / "vectors.h",)
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-shared")
# OpenMP: libgomp.so.1 is the one PyTorch loaded (its wheel ships it), so the kernels share its threads;
# a compiler without OpenMP builds them single-threaded instead.
THREADS = ("-fopenmp",)

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    # q, q strides; k, its strides (row, head, position); the same for v; counts; B, h, M, dk, dv,
    # bf16 (k and v bfloat16, else float32), threads; out, lse
    "yoco_dense_attention": [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64,
                             _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR],
    # q, q strides; k codes, strides, k scale, k zero, their strides; the same for values; counts;
    # B, h, M, dk, dv, bits, G, threads; out, lse
    "yoco_quantized_attention": [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64,
                                 _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64,
                                 _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR],
    # q, its strides (row, head, position); keys transposed, strides (row, head, dim); values, strides;
    # B, H, h, T, S, d, keys before the first query, window, scale, threads; out, its strides
    "yoco_window_attention": [_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64,
                              _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _I64, _PTR, _I64, _I64, _I64],
}

_loaded: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("YOCO_NATIVE", "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get("YOCO_CACHE_DIR") or Path.home() / ".cache" / "yoco") / "native"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(sources: tuple[Path, ...] = SOURCES) -> Path:
    """Compile ``sources`` into one shared library (if not built already) and return its path; raises
    RuntimeError with the compiler's message when it cannot."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    text = b"\0".join(path.read_bytes() for path in (*sources, *HEADERS))
    key = hashlib.sha256(text + "\0".join((cc, *FLAGS, *THREADS, sys.platform)).encode()).hexdigest()[:16]
    target = cache_dir() / f"yoco-kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        for threads in (THREADS, ()):
            done = subprocess.run([cc, *FLAGS, *threads, f"-I{CSRC}", *map(str, sources), "-o", partial, "-lm"],
                                  capture_output=True, text=True)
            if not done.returncode:
                break
        else:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or they could not be built: warned once)."""
    global _loaded, _tried
    if not enabled():
        return None
    if not _tried:
        _tried = True
        try:
            lib = ctypes.CDLL(str(build()))
            for name, arguments in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes, function.restype = arguments, ctypes.c_int
            _loaded = lib
        except (OSError, RuntimeError) as error:
            warnings.warn(f"yoco's native kernels are not available ({error}); using the PyTorch path",
                          RuntimeWarning, stacklevel=2)
    return _loaded
