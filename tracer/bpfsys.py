"""Maps, program loads, attachments and the ring buffer through libbcc_bpf.

libbcc_bpf is the half of bcc without LLVM: the bpf() and perf_event_open()
wrappers, libbpf's ring buffer, and nothing that compiles. Once a program is
compiled (see ``compiler``) this is all the tracer needs, so the process that
traces for hours never maps bcc's compiler (importing bcc alone costs 65 MB of
RSS; a compile 50 MB more).
"""
from __future__ import annotations

import ctypes as ct
import os

# enum bpf_map_type / bpf_prog_type values used here (uapi/linux/bpf.h)
MAP_PERCPU_ARRAY = 6
MAP_PERCPU_HASH = 5
MAP_LRU_PERCPU_HASH = 10
PERCPU_MAPS = (MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH)
PROG_KPROBE = 2
PROG_TRACEPOINT = 5
PROG_RAW_TRACEPOINT = 17


class BpfError(OSError):
    """A bpf()/perf_event_open() call failed; str() says which and why."""


def _lib():
    for name in ("libbcc_bpf.so.0", "libbcc_bpf.so"):
        try:
            return ct.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise BpfError("libbcc_bpf.so.0 not found: install bcc (Debian/Ubuntu: "
                   "apt-get install python3-bpfcc)")


_L = None
RINGBUF_CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_int)


def lib():
    """libbcc_bpf with the prototypes used here (loaded on first use)."""
    global _L
    if _L is None:
        L = _lib()
        sig = {
            "bcc_create_map": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]),
            "bcc_prog_load": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_void_p, ct.c_int, ct.c_char_p,
                                         ct.c_uint, ct.c_int, ct.c_char_p, ct.c_uint]),
            "bpf_lookup_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
            "bpf_update_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_ulonglong]),
            "bpf_get_first_key": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_uint]),
            "bpf_get_next_key": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
            "bpf_attach_raw_tracepoint": (ct.c_int, [ct.c_int, ct.c_char_p]),
            "bpf_attach_tracepoint": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_char_p]),
            "bpf_attach_kprobe": (ct.c_int, [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p,
                                             ct.c_ulonglong, ct.c_int]),
            "bpf_detach_kprobe": (ct.c_int, [ct.c_char_p]),
            "bpf_close_perf_event_fd": (ct.c_int, [ct.c_int]),
            "bpf_new_ringbuf": (ct.c_void_p, [ct.c_int, RINGBUF_CB, ct.c_void_p]),
            "bpf_poll_ringbuf": (ct.c_int, [ct.c_void_p, ct.c_int]),
            "bpf_consume_ringbuf": (ct.c_int, [ct.c_void_p]),
            "bpf_free_ringbuf": (None, [ct.c_void_p]),
            "bcc_symcache_new": (ct.c_void_p, [ct.c_int, ct.c_void_p]),
            "bcc_symcache_resolve": (ct.c_int, [ct.c_void_p, ct.c_ulonglong, ct.c_void_p]),
            "bcc_symbol_free_demangle_name": (None, [ct.c_void_p]),
        }
        for name, (res, args) in sig.items():
            f = getattr(L, name)
            f.restype, f.argtypes = res, args
        _L = L
    return _L


def _fail(what: str) -> BpfError:
    e = ct.get_errno()
    return BpfError(e, f"{what}: {os.strerror(e)}")


def possible_cpus() -> int:
    """The kernel sizes per-CPU values by possible CPUs, not online ones."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


class Map:
    """One map: byte keys and values (callers pack them with ctypes)."""

    def __init__(self, name: str, type_: int, key_size: int, value_size: int,
                 max_entries: int, flags: int):
        self.name, self.type = name, type_
        self.key_size, self.value_size = key_size, value_size
        self.fd = lib().bcc_create_map(type_, name.encode()[:15], key_size, value_size,
                                       max_entries, flags)
        if self.fd < 0:
            raise _fail(f"creating map {name}")
        # what one lookup returns: per-CPU maps give a value per possible CPU,
        # each padded to 8 bytes
        self.ncpu = possible_cpus() if type_ in PERCPU_MAPS else 1
        self.slot = (value_size + 7) // 8 * 8 if type_ in PERCPU_MAPS else value_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if lib().bpf_update_elem(self.fd, key, value, flags) < 0:
            raise _fail(f"updating map {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        buf = ct.create_string_buffer(self.slot * self.ncpu)
        if lib().bpf_lookup_elem(self.fd, key, buf) < 0:
            return None
        return buf.raw

    def percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self.slot:i * self.slot + self.value_size] for i in range(self.ncpu)]

    def keys(self) -> list[bytes]:
        L = lib()
        key = ct.create_string_buffer(self.key_size)
        nxt = ct.create_string_buffer(self.key_size)
        out = []
        if L.bpf_get_first_key(self.fd, key, self.key_size) < 0:
            return out
        while True:
            out.append(key.raw)
            if L.bpf_get_next_key(self.fd, key, nxt) < 0:
                return out
            ct.memmove(key, nxt, self.key_size)

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:        # deleted between the two calls
                out.append((k, v))
        return out


def load_program(prog_type: int, name: str, insns: bytes, license_: str, kern_version: int) -> int:
    """Load one program; on a verifier refusal libbcc_bpf retries with the log
    and prints it on stderr (the loader captures it)."""
    buf = ct.create_string_buffer(insns)
    fd = lib().bcc_prog_load(prog_type, name.encode()[:15], buf, len(insns),
                             license_.encode(), kern_version, 0, None, 0)
    if fd < 0:
        raise _fail(f"loading program {name}")
    return fd


class Attachment:
    """One attached program; ``close`` detaches it (safe to call twice)."""

    def __init__(self, kind: str, fd: int, ev_name: bytes | None = None):
        self.kind, self.fd, self.ev_name = kind, fd, ev_name

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if self.kind == "raw_tracepoint":
            os.close(fd)
        else:
            lib().bpf_close_perf_event_fd(fd)
            if self.ev_name is not None:
                # a kprobe made through tracefs (no kprobe PMU) must be removed
                lib().bpf_detach_kprobe(self.ev_name)


def attach_raw_tracepoint(prog_fd: int, tp: str) -> Attachment:
    fd = lib().bpf_attach_raw_tracepoint(prog_fd, tp.encode())
    if fd < 0:
        raise _fail(f"attaching to raw tracepoint {tp}")
    return Attachment("raw_tracepoint", fd)


def attach_tracepoint(prog_fd: int, category: str, event: str) -> Attachment:
    fd = lib().bpf_attach_tracepoint(prog_fd, category.encode(), event.encode())
    if fd < 0:
        raise _fail(f"attaching to tracepoint {category}:{event}")
    return Attachment("tracepoint", fd)


def attach_kprobe(prog_fd: int, function: str, ret: bool = False) -> Attachment:
    """A kprobe on entry, or with ``ret`` a return probe (kretprobe)."""
    # the event name bcc would use, so a leftover from either is recognisable
    ev = (("r_" if ret else "p_") + function.replace("+", "_").replace(".", "_")).encode()
    fd = lib().bpf_attach_kprobe(prog_fd, 1 if ret else 0, ev, function.encode(), 0, 0)
    if fd < 0:
        raise _fail(f"attaching a {'kretprobe' if ret else 'kprobe'} to {function}")
    return Attachment("kretprobe" if ret else "kprobe", fd, ev)


class RingBuffer:
    """libbpf's ring buffer consumer on one BPF_MAP_TYPE_RINGBUF map."""

    def __init__(self, map_fd: int, callback):
        # keep the ctypes callback alive as long as the ring buffer
        self._cb = RINGBUF_CB(callback)
        self.rb = lib().bpf_new_ringbuf(map_fd, self._cb, None)
        if not self.rb:
            raise _fail("opening the ring buffer")

    def poll(self, timeout_ms: int) -> int:
        return lib().bpf_poll_ringbuf(self.rb, timeout_ms)

    def consume(self) -> int:
        return lib().bpf_consume_ringbuf(self.rb)

    def close(self) -> None:
        rb, self.rb = self.rb, None
        if rb:
            lib().bpf_free_ringbuf(rb)


class _Symbol(ct.Structure):          # struct bcc_symbol (bcc_syms.h)
    _fields_ = [("name", ct.c_char_p), ("demangle_name", ct.c_char_p),
                ("module", ct.c_char_p), ("offset", ct.c_ulonglong)]


class Symbols:
    """Addresses to names with bcc's symbol caches (in libbcc_bpf, so --stack
    does not need the compiler either); pid -1 is the kernel. Lines look like
    bcc's BPF.ksym / BPF.sym: ``name+0xoff [module]``."""

    def __init__(self):
        self._caches: dict[int, int] = {}

    def _cache(self, pid: int) -> int:
        if pid not in self._caches:
            self._caches[pid] = lib().bcc_symcache_new(pid, None) or 0
        return self._caches[pid]

    def resolve(self, addr: int, pid: int = -1, show_module: bool = False) -> str:
        cache = self._cache(pid)
        sym = _Symbol()
        name = None
        if cache and lib().bcc_symcache_resolve(cache, addr, ct.byref(sym)) >= 0:
            name = (sym.demangle_name or sym.name or b"").decode("utf-8", "replace") or None
            lib().bcc_symbol_free_demangle_name(ct.byref(sym))
        out = f"{name}+0x{sym.offset:x}" if name else "[unknown]"
        if show_module and sym.module:
            out += f" [{os.path.basename(sym.module.decode('utf-8', 'replace'))}]"
        return out
