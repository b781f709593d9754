"""Create the maps, load the compiled functions and attach them; detach on
every exit.

No LLVM here: the program comes compiled (``compiler``, from the cache or a
helper process) and everything below goes through libbcc_bpf (``bpfsys``).
Which function attaches where follows bcc's naming, so the C reads as any
bcc program: ``kprobe__FN``, ``kretprobe__FN``, ``tracepoint__CAT__EVENT``,
``raw_tracepoint__EVENT``; ``ep_pipe_write`` goes to each pipe-write function
the plan found (their names differ between kernels).
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass, field

from . import bpfsys
from .bpfsys import BpfError
from .compiler import CompileError, Compiled, compile_program
from .headers import HeaderTree
from .plan import ProbePlan
from .program import Filters, ProgramOptions, render


class LoadError(Exception):
    """The program could not be compiled, loaded or attached."""


@dataclass
class Loaded:
    compiled: Compiled
    maps: dict[str, bpfsys.Map]
    prog_fds: list[int] = field(default_factory=list)
    attachments: list[bpfsys.Attachment] = field(default_factory=list)
    ring: bpfsys.RingBuffer | None = None
    attached: bool = True

    @property
    def full_vmlinux(self) -> bool:      # the cut vmlinux.h failed and the complete one was used
        return self.compiled.full_vmlinux

    @property
    def compile_seconds(self) -> float:
        return self.compiled.compile_seconds

    def detach(self) -> None:
        """Detach every probe, close every program and map. Safe to call twice."""
        if not self.attached:
            return
        self.attached = False
        for a in self.attachments:
            try:
                a.close()
            except OSError:
                pass
        if self.ring is not None:
            self.ring.close()
        for fd in self.prog_fds:
            os.close(fd)
        for m in self.maps.values():
            m.close()
        self.attachments, self.prog_fds, self.ring = [], [], None

    def open_ring_buffer(self, callback) -> None:
        self.ring = bpfsys.RingBuffer(self.maps["events"].fd, callback)

    def counts(self, table: str = "counts") -> list[tuple[bytes, int]]:
        """``counts``: exact, by facts; ``counts_remote``: by remote endpoint too."""
        return [(k, int.from_bytes(v[:8], "little")) for k, v in self.maps[table].items()]

    def stats(self) -> list[int]:
        """Per-stat sums over CPUs (see the stats map in bpf/epipe.bpf.c)."""
        t = self.maps["stats"]
        return [sum(int.from_bytes(v[:8], "little")
                    for v in t.percpu(bytes(ctypes.c_int(i))))
                for i in range(8)]

    def stack(self, stack_id: int) -> list[int]:
        """The addresses of one stack in the stacks map (innermost first)."""
        raw = self.maps["stacks"].lookup(bytes(ctypes.c_int(stack_id)))
        if raw is None:
            return []
        out = []
        for i in range(0, len(raw), 8):
            a = int.from_bytes(raw[i:i + 8], "little")
            if a == 0:
                break
            out.append(a)
        return out


class _CapturedStderr:
    """libbcc_bpf prints a refused program's verifier log straight to fd 2:
    keep it off the user's screen, but keep it to explain the refusal."""

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

    def tail(self, limit: int = 6) -> str:
        return "\n".join(self.text.strip().splitlines()[-limit:])


def attach_points(plan: ProbePlan, name: str) -> list[tuple[str, str]]:
    """Where one compiled function attaches, as (kind, target) pairs."""
    if name.startswith("kprobe__"):
        return [("kprobe", name[len("kprobe__"):])]
    if name.startswith("kretprobe__"):
        return [("kretprobe", name[len("kretprobe__"):])]
    if name.startswith("tracepoint__"):
        cat, _, ev = name[len("tracepoint__"):].partition("__")
        return [("tracepoint", f"{cat}:{ev}")]
    if name.startswith("raw_tracepoint__"):
        return [("raw_tracepoint", name[len("raw_tracepoint__"):])]
    if name == "ep_pipe_write":
        return [("kprobe", fn) for c in plan.choices
                if c.hook.name == "pipe_write_error" and c.mechanism == "kprobe"
                for fn in c.target.split(",")]
    return []


_PROG_TYPE = {"kprobe": bpfsys.PROG_KPROBE, "kretprobe": bpfsys.PROG_KPROBE,
              "tracepoint": bpfsys.PROG_TRACEPOINT,
              "raw_tracepoint": bpfsys.PROG_RAW_TRACEPOINT}


def _attach(kind: str, target: str, fd: int) -> bpfsys.Attachment:
    if kind in ("kprobe", "kretprobe"):
        return bpfsys.attach_kprobe(fd, target, ret=kind == "kretprobe")
    if kind == "tracepoint":
        return bpfsys.attach_tracepoint(fd, *target.split(":", 1))
    return bpfsys.attach_raw_tracepoint(fd, target)


def _load_and_attach(c: Compiled, plan: ProbePlan) -> Loaded:
    maps: dict[str, bpfsys.Map] = {}
    loaded = Loaded(c, maps)
    try:
        for m in c.maps:
            maps[m.name] = bpfsys.Map(m.name, m.type, m.key_size, m.value_size,
                                      m.max_entries, m.flags)
        fds = [maps[m.name].fd for m in c.maps]
        for f in c.funcs:
            points = attach_points(plan, f.name)
            if not points:
                continue
            fd = bpfsys.load_program(_PROG_TYPE[points[0][0]], f.name, c.relocated(f, fds),
                                     c.license, c.kern_version)
            loaded.prog_fds.append(fd)
            for kind, target in points:
                loaded.attachments.append(_attach(kind, target, fd))
    except BaseException:
        loaded.detach()
        raise
    return loaded


def load(tree: HeaderTree, plan: ProbePlan, filters: Filters,
         opts: ProgramOptions | None = None, use_cache: bool = True) -> Loaded:
    opts = opts or ProgramOptions()
    text = render(plan, filters, opts)
    try:
        c = compile_program(tree, text, reuse=use_cache)
    except CompileError as e:
        raise LoadError(f"bcc could not compile the program: {e}") from e
    with _CapturedStderr() as cap:
        try:
            loaded = _load_and_attach(c, plan)
        except BpfError as e:
            err = e
        else:
            err = None
    if os.environ.get("EPIPE_TRACE_DEBUG"):
        os.write(2, cap.text.encode())
    if err is not None and c.cached:
        # a cached program the kernel refuses (it changed under the same
        # release string?): compile afresh once before giving up
        return load(tree, plan, filters, opts, use_cache=False)
    if err is not None:
        detail = cap.tail()
        raise LoadError(f"could not load the program ({err})" + (f":\n{detail}" if detail else ""))
    try:
        if filters.pids:
            t = loaded.maps["target_pids"]
            for pid in filters.pids:
                t.update(bytes(ctypes.c_uint32(pid)), b"\x01")
        for name, ports in (("lports", filters.lports), ("dports", filters.dports)):
            if ports:
                t = loaded.maps[name]
                for p in ports:
                    t.update(bytes(ctypes.c_uint16(p)), b"\x01")
    except BaseException:
        loaded.detach()
        raise
    return loaded
