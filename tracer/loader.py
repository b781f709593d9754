"""Compile, load and attach the program through bcc; detach on every exit.

bcc is imported here and only here, after tracefs is mounted and
``BCC_KERNEL_SOURCE`` points at the header tree, because bcc reads both when
it is imported or when it compiles.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .headers import FULL_VMLINUX_DEFINE, HeaderTree
from .plan import ProbePlan
from .program import Filters, ProgramOptions, render


class LoadError(Exception):
    """bcc could not compile, load or attach the program."""


@dataclass
class Loaded:
    bpf: object                  # bcc.BPF
    compile_seconds: float
    text: str
    full_vmlinux: bool = False   # the cut vmlinux.h failed and the complete one was used

    def detach(self) -> None:
        """Detach every probe and free every map. Safe to call twice."""
        b, self.bpf = self.bpf, None
        if b is not None:
            # bcc registers cleanup() with atexit too, and a second run of it
            # fails on tracepoints already detached: run it once, here
            atexit.unregister(b.cleanup)
            b.cleanup()

    def counts(self, table: str = "counts") -> list[tuple[bytes, int]]:
        """``counts``: exact, by facts; ``counts_remote``: by remote endpoint too."""
        return [(bytes(k), v.value) for k, v in self.bpf[table].items()]

    def stats(self) -> list[int]:
        """Per-stat sums over CPUs (see the stats map in bpf/epipe.bpf.c)."""
        t = self.bpf["stats"]
        return [sum(t[ctypes.c_int(i)]) for i in range(8)]


class _CapturedStderr:
    """bcc prints clang's diagnostics straight to fd 2: keep them off the
    user's screen, but keep the errors to explain a failed compile."""

    def __enter__(self):
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False

    def errors(self, limit: int = 6) -> str:
        lines = [ln for ln in self.text.splitlines() if "error" in ln.lower()]
        return "\n".join(lines[:limit])


_COMPILER_LIBS = ("libbcc.so", "libLLVM", "libclang")
_MADV_DONTNEED = 4


def release_compiler_memory() -> int:
    """Give back what compiling cost once the program is loaded; returns the
    number of mappings released.

    bcc's embedded clang/LLVM leaves ~40 MB of freed heap and ~75 MB of
    touched library pages behind. malloc_trim returns the heap. Library
    mappings are dropped with MADV_DONTNEED only where that is lossless:
    read-only mappings with no anonymous (copy-on-write) pages, which refault
    from the file if ever used again. RELRO pages hold relocated pointers and
    do have anonymous pages, so they are kept.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        libc.malloc_trim(0)
    except AttributeError:          # not glibc
        pass
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released, cur = 0, None
    try:
        smaps = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return 0
    for line in smaps:
        parts = line.split()
        if not parts:
            continue
        if "-" in parts[0] and not parts[0].endswith(":"):
            cur = None
            if (len(parts) >= 6 and "w" not in parts[1]
                    and any(lib in parts[5] for lib in _COMPILER_LIBS)):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                cur = (lo, hi)
        elif parts[0] == "Anonymous:" and cur is not None:
            if int(parts[1]) == 0 and libc.madvise(cur[0], cur[1] - cur[0], _MADV_DONTNEED) == 0:
                released += 1
            cur = None
    return released


def load(tree: HeaderTree, plan: ProbePlan, filters: Filters,
         opts: ProgramOptions | None = None) -> Loaded:
    opts = opts or ProgramOptions()
    text = render(plan, filters, opts)
    if tree.kind == "btf-generated":
        os.environ["BCC_KERNEL_SOURCE"] = tree.path
    else:
        # real headers: let bcc find /lib/modules/<release>/{build,source}
        # itself; naming build alone hides the source half of Debian's split
        # headers (kconfig.h not found)
        os.environ.pop("BCC_KERNEL_SOURCE", None)
    t0 = time.monotonic()
    from bcc import BPF  # import only once BCC_KERNEL_SOURCE is set
    err = None
    b = None
    # a generated tree's vmlinux.h is cut to what this program reaches; the
    # complete one is the fallback should the cut ever miss a type
    variants = [[]]
    if tree.kind == "btf-generated" and (Path(tree.path) / "include/epipe/vmlinux-full.h").exists():
        variants.append([FULL_VMLINUX_DEFINE])
    for extra in variants:
        err = None
        with _CapturedStderr() as cap:
            try:
                b = BPF(text=text, cflags=["-Wno-everything", *extra])
            except Exception as e:  # bcc raises bare Exception on compile/load/attach errors
                err = e
        if os.environ.get("EPIPE_TRACE_DEBUG"):
            os.write(2, cap.text.encode())
        if err is None:
            break
    if err is not None:
        detail = cap.errors()
        raise LoadError(f"bcc could not compile/load the program ({err})"
                        + (f":\n{detail}" if detail else ""))
    # hooks whose kernel function differs between versions are attached here,
    # to each function the plan found (the rest attach by their names)
    for c in plan.choices:
        if c.hook.name == "pipe_write_error" and c.mechanism == "kprobe":
            for fn in c.target.split(","):
                try:
                    b.attach_kprobe(event=fn, fn_name="ep_pipe_write")
                except Exception as e:  # noqa: BLE001
                    b.cleanup()
                    raise LoadError(f"could not attach a kprobe to {fn}: {e}") from e
    loaded = Loaded(b, time.monotonic() - t0, text, full_vmlinux=bool(extra))
    if not os.environ.get("EPIPE_TRACE_KEEP_COMPILER"):
        release_compiler_memory()
    try:
        if filters.pids:
            t = b["target_pids"]
            for pid in filters.pids:
                t[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        for name, ports in (("lports", filters.lports), ("dports", filters.dports)):
            if ports:
                t = b[name]
                for p in ports:
                    t[ctypes.c_uint16(p)] = ctypes.c_uint8(1)
    except BaseException:
        loaded.detach()
        raise
    return loaded
