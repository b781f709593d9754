"""What the running kernel offers, found out rather than assumed.

Everything downstream (header tree, probe plan, doctor) reads a
``KernelCapabilities``. Kprobes are judged from the kernel's own interfaces,
fentry by actually loading and attaching a trivial program (a kernel may have
BTF and still refuse trampolines, as Firecracker guests under lockdown do),
tracepoints from their tracefs format files, whose field lists are kept so the
plan can check the fields it reads.
"""
from __future__ import annotations

import ctypes
import errno
import gzip
import os
import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .btf import BTF, BTFError, FuncSignature, VMLINUX_BTF

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# Tracepoints the plan may use: (category, name).
TRACEPOINTS = (
    ("sock", "inet_sock_set_state"),
    ("tcp", "tcp_receive_reset"),
    ("sock", "inet_sk_error_report"),
    ("sock", "sock_send_length"),
    ("signal", "signal_generate"),
    ("signal", "signal_deliver"),
    ("sched", "sched_process_exit"),
    ("syscalls", "sys_exit_write"),
    ("syscalls", "sys_exit_writev"),
    ("syscalls", "sys_exit_sendto"),
    ("syscalls", "sys_exit_sendmsg"),
    ("syscalls", "sys_exit_sendmmsg"),
    ("syscalls", "sys_exit_sendfile64"),
    ("syscalls", "sys_exit_splice"),
    ("syscalls", "sys_exit_accept"),
    ("syscalls", "sys_exit_accept4"),
    ("syscalls", "sys_enter_shutdown"),
    ("syscalls", "sys_enter_close"),
)

# Kernel functions the plan may probe; pipe_write was split into
# anon_pipe_write/fifo_pipe_write in 6.x.
FUNCTIONS = (
    "tcp_reset", "sk_stream_error", "tcp_set_state", "tcp_done",
    "unix_stream_sendmsg", "unix_seqpacket_sendmsg",
    "pipe_write", "anon_pipe_write", "fifo_pipe_write",
)


@dataclass
class KernelCapabilities:
    release: str
    machine: str
    btf: bool
    btf_path: str | None
    headers_dir: str | None          # /lib/modules/<release>/build when it exists
    kprobes: bool                     # the kernel can create kprobes at all
    kprobes_reason: str
    fentry: bool                      # a fentry program loaded *and* attached
    fentry_reason: str
    raw_tracepoints: bool
    ringbuf: bool
    tracefs: str | None
    tracepoints: dict[str, list[str]] = field(default_factory=dict)  # "cat:name" -> fields
    functions: dict[str, list[str] | None] = field(default_factory=dict)  # name -> param types (None: not probeable)
    # bpf_task_pt_regs() (5.15+): a probe inside a syscall can read the
    # syscall's number and arguments without hooking the syscall
    task_regs: bool = False
    config: dict[str, str] = field(default_factory=dict)  # CONFIG_* that matter

    def has_tracepoint(self, name: str) -> bool:
        return name in self.tracepoints

    def has_function(self, name: str) -> bool:
        return self.functions.get(name) is not None

    def to_dict(self) -> dict:
        return {
            "release": self.release, "machine": self.machine,
            "btf": self.btf, "btf_path": self.btf_path, "headers_dir": self.headers_dir,
            "kprobes": self.kprobes, "kprobes_reason": self.kprobes_reason,
            "fentry": self.fentry, "fentry_reason": self.fentry_reason,
            "raw_tracepoints": self.raw_tracepoints, "ringbuf": self.ringbuf,
            "task_regs": self.task_regs,
            "tracefs": self.tracefs,
            "tracepoints": self.tracepoints, "functions": self.functions,
            "config": self.config,
        }


# --- tracefs -----------------------------------------------------------------

def find_or_mount_tracefs() -> str | None:
    """Return a tracefs mount point, mounting tracefs when none is mounted.

    bcc picks its tracefs path when it is imported, so this must run first.
    """
    for cand in TRACEFS_CANDIDATES:
        if (cand / "events").is_dir():
            return str(cand)
    target = TRACEFS_CANDIDATES[0]
    if not target.is_dir():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"tracefs", str(target).encode(), b"tracefs", 0, None)
    if rc == 0 and (target / "events").is_dir():
        return str(target)
    return None


def _tracepoint_fields(tracefs: str, cat: str, name: str) -> list[str] | None:
    fmt = Path(tracefs, "events", cat, name, "format")
    try:
        text = fmt.read_text()
    except OSError:
        return None
    fields = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        decl = line.split(";", 1)[0][len("field:"):].strip()
        ident = decl.split("[", 1)[0].split()[-1]
        if not ident.startswith("common_"):
            fields.append(ident)
    return fields


# --- kernel config -----------------------------------------------------------

_CONFIG_KEYS = ("CONFIG_KPROBES", "CONFIG_BPF_EVENTS", "CONFIG_FTRACE_SYSCALLS",
                "CONFIG_DEBUG_INFO_BTF", "CONFIG_IKHEADERS", "CONFIG_BPF_JIT",
                "CONFIG_FUNCTION_TRACER", "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS",
                "CONFIG_SECURITY_LOCKDOWN_LSM", "CONFIG_CGROUP_BPF")


def read_kernel_config(release: str) -> dict[str, str]:
    """All CONFIG_* of the running kernel, from /proc/config.gz or /boot."""
    text = None
    try:
        text = gzip.open("/proc/config.gz", "rt").read()
    except OSError:
        for p in (f"/boot/config-{release}", f"/lib/modules/{release}/build/.config"):
            try:
                text = Path(p).read_text()
                break
            except OSError:
                continue
    cfg: dict[str, str] = {}
    for line in (text or "").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            cfg[k] = v
    return cfg


# --- kprobes -----------------------------------------------------------------

def _kprobes_available(tracefs: str | None, config: dict[str, str]) -> tuple[bool, str]:
    if Path("/sys/bus/event_source/devices/kprobe/type").exists():
        return True, "perf kprobe PMU present"
    if tracefs and Path(tracefs, "kprobe_events").exists():
        return True, "tracefs kprobe_events present"
    if config and config.get("CONFIG_KPROBES") != "y":
        return False, "kernel built without CONFIG_KPROBES"
    return False, "no kprobe PMU and no kprobe_events in tracefs"


def _kallsyms_text(wanted) -> set[str] | None:
    """Which of ``wanted`` are text symbols (None when kallsyms is unreadable).
    Only the wanted names are kept: all of them would be ~150k strings."""
    wanted, names, lines = set(wanted), set(), 0
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                lines += 1
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("t", "T") and parts[2] in wanted:
                    names.add(parts[2])
    except OSError:
        return None
    return names if lines else None


def _kprobe_blacklist() -> set[str]:
    names = set()
    for p in ("/sys/kernel/debug/kprobes/blacklist",):
        try:
            for line in Path(p).read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    names.add(parts[1])
        except OSError:
            pass
    return names


# --- bpf(2) probes -----------------------------------------------------------

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN, BPF_MAP_CREATE = 5, 17, 0
BPF_PROG_TYPE_TRACING, BPF_PROG_TYPE_RAW_TRACEPOINT = 26, 17
BPF_TRACE_FENTRY = 24
BPF_MAP_TYPE_RINGBUF = 27


def _bpf(cmd: int, attr: bytearray) -> tuple[int, int]:
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    fd = libc.syscall(nr, cmd, buf, len(attr))
    return fd, ctypes.get_errno()


_TRIVIAL = ((0xB7, 0, 0, 0),         # r0 = 0
            (0x95, 0, 0, 0))         # exit


def _load_trivial(prog_type: int, attach_type: int = 0, btf_id: int = 0,
                  program: tuple = _TRIVIAL) -> tuple[int, int]:
    """Load a tiny program (default: return 0); (fd, errno)."""
    insns = b"".join(struct.pack("<BBhi", *i) for i in program)
    insn_buf = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(144)
    struct.pack_into("<IIQQ", attr, 0, prog_type, len(program), ctypes.addressof(insn_buf),
                     ctypes.addressof(lic))
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    return _bpf(BPF_PROG_LOAD, attr)


def probe_fentry(btf: BTF | None, func: str = "tcp_reset") -> tuple[bool, str]:
    """Load and attach a do-nothing fentry program; the only reliable test."""
    if btf is None:
        return False, "no BTF"
    sig = btf.func(func)
    if sig is None:
        return False, f"{func} not in BTF"
    fd, err = _load_trivial(BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, sig.btf_id)
    if fd < 0:
        return False, f"fentry program load refused: {errno.errorcode.get(err, err)}"
    try:
        attr = bytearray(16)
        struct.pack_into("<QI", attr, 0, 0, fd)
        lfd, err = _bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
        if lfd < 0:
            return False, f"fentry attach refused: {errno.errorcode.get(err, err)}"
        os.close(lfd)
        return True, "fentry program loaded and attached"
    finally:
        os.close(fd)


def probe_raw_tracepoint() -> bool:
    fd, _ = _load_trivial(BPF_PROG_TYPE_RAW_TRACEPOINT)
    if fd < 0:
        return False
    os.close(fd)
    return True


def probe_task_regs() -> bool:
    """Does the verifier know bpf_task_pt_regs (helper 175, 5.15+)? A raw
    tracepoint program calling it on bpf_get_current_task_btf() (158)."""
    fd, _ = _load_trivial(BPF_PROG_TYPE_RAW_TRACEPOINT, program=(
        (0x85, 0, 0, 158),          # call bpf_get_current_task_btf
        (0xBF, 0x01, 0, 0),         # r1 = r0
        (0x85, 0, 0, 175),          # call bpf_task_pt_regs
        *_TRIVIAL))
    if fd < 0:
        return False
    os.close(fd)
    return True


def probe_ringbuf() -> bool:
    attr = bytearray(72)
    struct.pack_into("<IIII", attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    fd, _ = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        return False
    os.close(fd)
    return True


# --- the whole picture -------------------------------------------------------

def detect(try_fentry: bool = True) -> KernelCapabilities:
    release = platform.release()
    tracefs = find_or_mount_tracefs()
    config = read_kernel_config(release)
    btf = None
    if VMLINUX_BTF.exists():
        try:
            btf = BTF.from_file(VMLINUX_BTF)
        except BTFError:
            btf = None
    headers = Path(f"/lib/modules/{release}/build")
    kprobes, kreason = _kprobes_available(tracefs, config)
    if try_fentry:
        fentry, freason = probe_fentry(btf)
    else:
        fentry, freason = False, "not tried"
    caps = KernelCapabilities(
        release=release, machine=platform.machine(),
        btf=btf is not None, btf_path=str(VMLINUX_BTF) if btf else None,
        headers_dir=str(headers) if (headers / "include").is_dir() else None,
        kprobes=kprobes, kprobes_reason=kreason,
        fentry=fentry, fentry_reason=freason,
        raw_tracepoints=probe_raw_tracepoint(), ringbuf=probe_ringbuf(),
        task_regs=btf is not None and probe_task_regs(),
        tracefs=tracefs,
        config={k: config.get(k, "n") for k in _CONFIG_KEYS} if config else {},
    )
    if tracefs:
        for cat, name in TRACEPOINTS:
            fields = _tracepoint_fields(tracefs, cat, name)
            if fields is not None:
                caps.tracepoints[f"{cat}:{name}"] = fields
    ksyms = _kallsyms_text(FUNCTIONS)
    blacklist = _kprobe_blacklist()
    for fn in FUNCTIONS:
        sig: FuncSignature | None = btf.func(fn) if btf else None
        present = fn in ksyms if ksyms is not None else sig is not None
        if not present or fn in blacklist:
            caps.functions[fn] = None
        else:
            caps.functions[fn] = list(sig.param_types()) if sig else []
    return caps
