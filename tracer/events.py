"""Decode what the kernel side sends: ring-buffer events and counter keys.

The ctypes layouts mirror the structs in bpf/epipe.bpf.c field for field
(natural alignment on both sides). Decoding turns them into plain dataclasses
that the explain step and the tests can build by hand.
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import dataclass, field

EV_FAIL, EV_DELIVER, EV_EXIT = 1, 2, 3
KIND_NAMES = {0: "other", 1: "tcp", 2: "unix", 3: "pipe", 4: "fifo", 5: "socket"}
PATH_NAMES = {0: None, 1: "sk_stream_error", 2: "sock_sendmsg", 3: "pipe_write",
              4: "unix_stream_sendmsg"}
NOSIG = 0xFF
NSTATES = 8

TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
    11: "CLOSING", 12: "NEW_SYN_RECV",
}
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_CLOSE, TCP_CLOSE_WAIT = 1, 2, 7, 8


class _StateRec(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("oldstate", ct.c_uint8), ("newstate", ct.c_uint8),
                ("pad", ct.c_uint8 * 6)]


class _Hist(ct.Structure):
    _fields_ = [
        ("first_ts", ct.c_uint64), ("est_ts", ct.c_uint64), ("close_wait_ts", ct.c_uint64),
        ("accept_ts", ct.c_uint64), ("rst_ts", ct.c_uint64), ("shut_ts", ct.c_uint64),
        ("err_ts", ct.c_uint64), ("peer_close_ts", ct.c_uint64),
        ("accept_pid", ct.c_uint32), ("shut_pid", ct.c_uint32), ("peer_close_pid", ct.c_uint32),
        ("err_reported", ct.c_int32), ("rst_sk_err", ct.c_int32),
        ("rst_state", ct.c_uint8), ("shut_how", ct.c_uint8), ("nstates", ct.c_uint8),
        ("family", ct.c_uint8), ("lport", ct.c_uint16), ("rport", ct.c_uint16),
        ("laddr", ct.c_uint8 * 16), ("raddr", ct.c_uint8 * 16),
        ("peer_close_comm", ct.c_char * 16),
        ("hflags", ct.c_uint8), ("hpad", ct.c_uint8 * 7),
        ("states", _StateRec * NSTATES),
    ]


class RawEvent(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint8), ("kind", ct.c_uint8), ("path", ct.c_uint8),
        ("sig_result", ct.c_uint8), ("sig_blocked", ct.c_uint8), ("sig_disp", ct.c_uint8),
        ("state_now", ct.c_uint8), ("sk_shutdown", ct.c_uint8), ("has_hist", ct.c_uint8),
        ("sock_type", ct.c_uint8), ("peer_gone", ct.c_uint8), ("peer_shutdown", ct.c_uint8),
        ("pipe_how", ct.c_uint8), ("shut_how", ct.c_uint8),
        ("accepted_after_close", ct.c_uint8), ("pad", ct.c_uint8),
        ("pid", ct.c_uint32), ("tid", ct.c_uint32), ("ret", ct.c_int32), ("fd", ct.c_int32),
        ("syscall_nr", ct.c_uint32), ("flags", ct.c_uint32), ("err_at_hook", ct.c_int32),
        ("sk_err_at_hook", ct.c_int32), ("kstack", ct.c_int32), ("ustack", ct.c_int32),
        ("peer_pid", ct.c_uint32), ("pipe_readers", ct.c_uint32), ("pipe_writers", ct.c_uint32),
        ("pipe_reader_pid", ct.c_uint32), ("pipe_reader_exit", ct.c_int32), ("ino", ct.c_uint32),
        ("ts", ct.c_uint64), ("sk", ct.c_uint64), ("sig_handler", ct.c_uint64),
        ("bytes_sent", ct.c_uint64), ("bytes_acked", ct.c_uint64), ("bytes_received", ct.c_uint64),
        ("pipe_reader_ts", ct.c_uint64), ("cgroup", ct.c_uint64),
        ("comm", ct.c_char * 16), ("peer_comm", ct.c_char * 16), ("name", ct.c_char * 64),
        ("hist", _Hist),
    ]


class RawCountKey(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint8), ("rst_state", ct.c_uint8), ("shut_how", ct.c_uint8),
        ("accepted_after_close", ct.c_uint8), ("state_now", ct.c_uint8), ("nosignal", ct.c_uint8),
        ("sig_result", ct.c_uint8), ("sig_blocked", ct.c_uint8), ("sig_disp", ct.c_uint8),
        ("family", ct.c_uint8), ("peer_gone", ct.c_uint8), ("has_hist", ct.c_uint8),
        ("rport", ct.c_uint16), ("pad", ct.c_uint16), ("err", ct.c_int32),
        ("err_reported", ct.c_int32), ("raddr", ct.c_uint8 * 16),
    ]


# --- decoded forms ---------------------------------------------------------------

@dataclass
class StateChange:
    ts: int
    old: int
    new: int


@dataclass
class SocketHistory:
    """What the kernel remembered about one socket before the failure."""
    first_ts: int = 0
    est_ts: int = 0
    close_wait_ts: int = 0
    accept_ts: int = 0
    accept_pid: int = 0
    rst_ts: int = 0
    rst_state: int = 0          # 0: no RST seen
    rst_sk_err: int = 0
    shut_ts: int = 0
    shut_how: int = 0           # how + 1; 0: none seen; 4, 5: inferred (explain.SHUT_NAMES)
    shut_pid: int = 0
    err_ts: int = 0
    err_reported: int = 0
    peer_close_ts: int = 0
    peer_close_pid: int = 0
    peer_close_comm: bytes = b""
    states: list[StateChange] = field(default_factory=list)
    states_dropped: int = 0     # older transitions that fell out of the ring
    passive: bool = False       # a listener's child (accepted, or waiting to be)
    unaccepted_at_fin: bool = False  # the peer's FIN came before accept() took it


@dataclass
class Facts:
    """Exactly what classification uses; built from an event or a counter key."""
    kind: str
    err: int                    # the syscall's return value (negative errno)
    rst_state: int = 0
    shut_how: int = 0
    accepted_after_close: bool = False
    state_now: int = 0
    err_reported: int = 0
    has_hist: bool = False
    peer_gone: bool = False
    nosignal: bool = False
    sig_result: int = NOSIG
    sig_blocked: bool = False
    sig_disp: int = 0           # 0 SIG_DFL, 1 SIG_IGN, 2 handler


@dataclass
class Endpoint:
    family: int = 0
    laddr: str = ""
    lport: int = 0
    raddr: str = ""
    rport: int = 0

    def local(self) -> str:
        return _hostport(self.laddr, self.lport, self.family)

    def remote(self) -> str:
        return _hostport(self.raddr, self.rport, self.family)


@dataclass
class FailEvent:
    ts: int
    pid: int
    tid: int
    comm: bytes
    ret: int
    fd: int
    syscall: str
    flags: int
    facts: Facts
    endpoint: Endpoint = field(default_factory=Endpoint)
    history: SocketHistory | None = None
    path: str | None = None     # kernel hook that observed the error
    err_at_hook: int = 0
    sk_err_at_hook: int = 0
    sk_shutdown: int = 0
    sig_handler: int = 0
    sk: int = 0
    bytes_sent: int = 0
    bytes_acked: int = 0
    bytes_received: int = 0
    peer_pid: int = 0
    peer_shutdown: int = 0
    name: bytes = b""           # UNIX address or pipe/FIFO dentry name
    fifo_path: str | None = None  # full FIFO path, resolved in user space (see session)
    ino: int = 0
    pipe_readers: int = 0
    pipe_writers: int = 0
    pipe_reader_pid: int = 0
    pipe_reader_comm: bytes = b""
    pipe_reader_how: int = 0    # 1 closed the fd, 2 exited
    pipe_reader_exit: int = 0
    pipe_reader_ts: int = 0
    kstack: int = -1
    ustack: int = -1
    cgroup: int = 0


@dataclass
class DeliverEvent:
    ts: int
    pid: int
    tid: int
    comm: bytes
    handler: int


@dataclass
class ExitEvent:
    ts: int
    pid: int
    comm: bytes
    exit_code: int


def _addr(raw, family: int) -> str:
    b = bytes(raw)
    if family == 2:
        return str(ipaddress.IPv4Address(b[:4]))
    if family == 10:
        a = ipaddress.IPv6Address(b)
        return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)
    return ""


def _hostport(addr: str, port: int, family: int) -> str:
    if not addr and not port:
        return "-"
    if family == 10 and ":" in addr:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def decode_history(h: _Hist) -> SocketHistory:
    n = h.nstates
    first = max(0, n - NSTATES)
    states = []
    for i in range(first, n):
        r = h.states[i % NSTATES]
        states.append(StateChange(r.ts, r.oldstate, r.newstate))
    return SocketHistory(
        first_ts=h.first_ts, est_ts=h.est_ts, close_wait_ts=h.close_wait_ts,
        accept_ts=h.accept_ts, accept_pid=h.accept_pid, rst_ts=h.rst_ts,
        rst_state=h.rst_state, rst_sk_err=h.rst_sk_err, shut_ts=h.shut_ts,
        shut_how=h.shut_how, shut_pid=h.shut_pid, err_ts=h.err_ts,
        err_reported=h.err_reported, peer_close_ts=h.peer_close_ts,
        peer_close_pid=h.peer_close_pid, peer_close_comm=h.peer_close_comm,
        states=states, states_dropped=first, passive=bool(h.hflags & 1),
        unaccepted_at_fin=bool(h.hflags & 2))


def _syscall_name(nr: int, names: dict[int, str]) -> str:
    if nr == 0xFFFFFFFF:
        # not in a send-family syscall: io_uring, a kernel thread
        return "-"
    return names.get(nr, f"syscall {nr}")


def decode(data: bytes | int, size: int | None = None, syscalls: dict[int, str] | None = None):
    """One ring-buffer record -> FailEvent | DeliverEvent | ExitEvent."""
    if isinstance(data, int):        # bcc passes a pointer
        raw = ct.cast(data, ct.POINTER(RawEvent)).contents
    else:
        raw = RawEvent.from_buffer_copy(data)
    if raw.type == EV_DELIVER:
        return DeliverEvent(raw.ts, raw.pid, raw.tid, raw.comm, raw.sig_handler)
    if raw.type == EV_EXIT:
        return ExitEvent(raw.ts, raw.pid, raw.comm, raw.ret)
    hist = decode_history(raw.hist) if raw.has_hist else None
    h = raw.hist
    ep = Endpoint()
    if raw.kind == 1:
        ep = Endpoint(h.family, _addr(h.laddr, h.family), h.lport, _addr(h.raddr, h.family), h.rport)
    facts = Facts(
        kind=KIND_NAMES.get(raw.kind, "other"), err=raw.ret,
        rst_state=h.rst_state if hist else 0, shut_how=raw.shut_how,
        accepted_after_close=bool(raw.accepted_after_close),
        state_now=raw.state_now, err_reported=h.err_reported if hist else 0,
        has_hist=bool(hist), peer_gone=bool(raw.peer_gone),
        nosignal=bool(raw.flags & 0x4000), sig_result=raw.sig_result,
        sig_blocked=bool(raw.sig_blocked), sig_disp=raw.sig_disp)
    names = syscalls or {}
    return FailEvent(
        ts=raw.ts, pid=raw.pid, tid=raw.tid, comm=raw.comm, ret=raw.ret, fd=raw.fd,
        syscall=_syscall_name(raw.syscall_nr, names), flags=raw.flags,
        facts=facts, endpoint=ep, history=hist, path=PATH_NAMES.get(raw.path),
        err_at_hook=raw.err_at_hook, sk_err_at_hook=raw.sk_err_at_hook,
        sk_shutdown=raw.sk_shutdown, sig_handler=raw.sig_handler, sk=raw.sk,
        bytes_sent=raw.bytes_sent, bytes_acked=raw.bytes_acked,
        bytes_received=raw.bytes_received, peer_pid=raw.peer_pid,
        peer_shutdown=raw.peer_shutdown, name=raw.name, ino=raw.ino,
        pipe_readers=raw.pipe_readers, pipe_writers=raw.pipe_writers,
        pipe_reader_pid=raw.pipe_reader_pid, pipe_reader_comm=raw.peer_comm,
        pipe_reader_how=raw.pipe_how, pipe_reader_exit=raw.pipe_reader_exit,
        pipe_reader_ts=raw.pipe_reader_ts, kstack=raw.kstack, ustack=raw.ustack,
        cgroup=raw.cgroup)


def decode_count_key(raw: bytes) -> tuple[Facts, Endpoint]:
    k = RawCountKey.from_buffer_copy(raw)
    facts = Facts(
        kind=KIND_NAMES.get(k.kind, "other"), err=k.err, rst_state=k.rst_state,
        shut_how=k.shut_how, accepted_after_close=bool(k.accepted_after_close),
        state_now=k.state_now, err_reported=k.err_reported, has_hist=bool(k.has_hist),
        peer_gone=bool(k.peer_gone), nosignal=bool(k.nosignal), sig_result=k.sig_result,
        sig_blocked=bool(k.sig_blocked), sig_disp=k.sig_disp)
    ep = Endpoint(k.family, "", 0, _addr(k.raddr, k.family), k.rport) if k.kind == 1 else Endpoint()
    return facts, ep
