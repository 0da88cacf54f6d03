"""One OpenMP runtime for torch and numba, chosen before torch loads.

A CPU step runs its matmuls on torch's OpenMP threads and its decode attention on numba's
(serve_app/engine/attention.py). torch's wheel brings its own copy of libgomp and numba's OpenMP
layer links the system's, so a process held two runtimes, each with a worker that spins after
its region (GOMP_SPINCOUNT) while the other runtime's region starts: on 2 cores, three threads
for two CPUs at every switch between a matmul and the attention, twice a layer, and a worker
woken from sleep at each. Loaded first, the system's libgomp (same soname, `libgomp.so.1`) is
the one libtorch binds to as well, and one pool of workers serves both. In-process on the 2-core
Xeon with AMX (bf16 gpt2-small, a burst of 32 x 64 tokens, 2 threads; two alternating pairs of
processes of four bursts): 1096-1108 and 1154-1176 tokens/s against 1045-1105 and 1124-1162.

It only does so where it is safe to: on Linux, before torch is imported, when torch's copy is the
`libgomp.so.1` its libraries ask for, and when the system's copy defines every symbol version
that torch's does (a newer GCC's libgomp serves code built against an older one, not the other
way round). Elsewhere each keeps its own, as before. QUILL_SHARED_OPENMP=0 turns it off.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys
import sysconfig
from pathlib import Path

_NAME = "libgomp.so.1"
# A version name in the library's string table; not after a letter, as the linker may store
# "OMP_4.5" as the tail of "GOMP_4.5" (a name found in torch's copy only thus makes it say no).
_VERSION = re.compile(rb"(?<![A-Za-z_])((?:GOMP|OMP|GOMP_PLUGIN)_[0-9][0-9.]*[0-9])\x00")


def _torch_copy() -> Path | None:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / _NAME
    return path if path.is_file() else None


def _system_copy() -> Path | None:
    """The libgomp numba's OpenMP layer loads: in the system's library folders."""
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    folders = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    for folder in [*folders, "/usr/lib64", "/lib64", "/usr/lib"]:
        path = Path(folder) / _NAME
        if path.is_file():
            return path
    return None


def symbol_versions(path: Path) -> set[bytes]:
    """The version names (GOMP_4.5, OMP_5.0.1, ...) a libgomp defines or asks for."""
    return set(_VERSION.findall(path.read_bytes()))


def share_openmp_runtime() -> Path | None:
    """Load the system's libgomp so that torch binds to it too; the path loaded, or None."""
    if os.environ.get("QUILL_SHARED_OPENMP", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if "torch" in sys.modules:  # too late: torch is bound to its own copy already
        return None
    torch_copy, system_copy = _torch_copy(), _system_copy()
    if torch_copy is None or system_copy is None:
        return None
    try:
        if not symbol_versions(torch_copy) <= symbol_versions(system_copy):
            return None
        ctypes.CDLL(str(system_copy))
    except OSError:
        return None
    return system_copy
