"""From facts to a verdict: cause, SIGPIPE fate, and a sentence.

Pure functions over the decoded events (tracer/events.py), so every rule can
be tested with hand-built facts. ``classify`` and ``sigpipe_fate`` see only
``Facts`` -- the same fields the kernel uses as its counter key -- so the live
lines and the exact exit summary always agree. What was not observed is said
to be unknown, never guessed.

Kernel logic this mirrors (net/ipv4/tcp_input.c ``tcp_reset``,
net/core/stream.c ``sk_stream_error``): a RST in CLOSE_WAIT sets sk_err=EPIPE,
in SYN_SENT ECONNREFUSED, elsewhere ECONNRESET; a send with sk_err set or
SEND_SHUTDOWN fails with EPIPE, replaced by a pending sk_err, and raises
SIGPIPE unless MSG_NOSIGNAL.
"""
from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from .events import (NOSIG, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_STATES, TCP_SYN_SENT, Facts,
                     FailEvent)

EPIPE, ECONNRESET = _errno.EPIPE, _errno.ECONNRESET
# keyed by how + 1 (seen by the shutdown() hook), or inferred without it:
# 4 = TCP, the FIN we sent while the socket was open; 5 = UNIX, our send side
# shut while the peer is open (the peer's shutdown(SHUT_RD) looks the same)
SHUT_NAMES = {1: "SHUT_RD", 2: "SHUT_WR", 3: "SHUT_RDWR", 4: "SHUT_WR or SHUT_RDWR",
              5: "SHUT_WR"}
OWN_SHUTDOWN = (2, 3, 4, 5)

# stable cause identifiers -> plain words
CAUSES = {
    "own_shutdown": "our own shutdown",
    "accepted_after_peer_closed": "accepted after the peer had already closed",
    "peer_reset_after_close": "peer reset after it closed",
    "reset_while_established": "reset while established",
    "reset_while_connecting": "reset while connecting (refused)",
    "connection_dead": "connection already dead",
    "peer_closed": "peer closed",
    "no_readers": "no readers left",
    "unknown": "unknown",
}

FATES = {
    "suppressed": "suppressed (MSG_NOSIGNAL)",
    "ignored": "ignored (SIG_IGN)",
    "blocked": "blocked (left pending)",
    "caught": "caught by a handler",
    "fatal": "fatal (default action)",
    "killed": "fatal: process killed",
    "pending": "already pending",
    "not_raised": "none raised by the kernel",
    "not_seen": "not observed",
}


def errname(err: int) -> str:
    e = abs(err)
    return _errno.errorcode.get(e, str(e)) if e else "0"


def state_name(s: int) -> str:
    return TCP_STATES.get(s, str(s))


def classify(f: Facts) -> str:
    """The cause identifier for one failing send."""
    if f.kind == "pipe" or f.kind == "fifo":
        return "no_readers" if f.peer_gone or f.err == -EPIPE else "unknown"
    if f.kind == "unix":
        if f.shut_how in OWN_SHUTDOWN:
            return "own_shutdown"
        return "peer_closed" if f.err == -EPIPE else "unknown"
    if f.kind != "tcp":
        return "unknown"
    if f.shut_how in OWN_SHUTDOWN:
        return "own_shutdown"
    if f.accepted_after_close:
        return "accepted_after_peer_closed"
    if f.rst_state == TCP_CLOSE_WAIT:
        return "peer_reset_after_close"
    if f.rst_state == TCP_SYN_SENT:
        return "reset_while_connecting"
    if f.rst_state:
        return "reset_while_established"
    if f.err_reported and f.err_reported not in (EPIPE, ECONNRESET):
        return "connection_dead"          # ETIMEDOUT, ECONNABORTED, EHOSTUNREACH...
    if f.state_now == TCP_CLOSE and f.has_hist:
        return "connection_dead"
    return "unknown"


def sigpipe_fate(f: Facts, sig_observed: bool = True) -> str:
    """What became of the SIGPIPE this send raised (or why there was none).

    ``sig_observed``: the signal_generate hook is attached, so a SIGPIPE
    that did not show up was not raised (a UNIX seqpacket send fails with
    EPIPE and raises none); without the hook we cannot tell and say so.
    """
    if f.err != -EPIPE:
        return "not_raised"
    if f.nosignal:
        return "suppressed"
    if f.sig_result == NOSIG:
        return "not_raised" if sig_observed else "not_seen"
    if f.sig_result == 1:
        return "ignored"
    if f.sig_result == 2:
        return "pending"
    if f.sig_blocked:
        return "blocked"
    if f.sig_disp == 2:
        return "caught"
    if f.sig_disp == 1:
        return "ignored"
    return "fatal"


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


@dataclass
class Verdict:
    cause: str
    fate: str
    sentence: str
    queue_wait_ns: int | None = None     # accept-queue wait, when known
    details: dict | None = None


def explain(ev: FailEvent, sig_observed: bool = True) -> Verdict:
    f = ev.facts
    cause = classify(f)
    fate = sigpipe_fate(f, sig_observed)
    h = ev.history
    parts: list[str] = []
    queue_wait = None
    details: dict = {}
    if f.kind == "tcp":
        peer = ev.endpoint.remote()
        if cause == "own_shutdown" and h:
            ago = ev.ts - h.shut_ts if h.shut_ts else 0
            if h.shut_how == 4:
                parts.append(f"pid {h.shut_pid} sent our FIN with shutdown(SHUT_WR or "
                             f"SHUT_RDWR) {_ms(ago)} before this {ev.syscall} (seen as "
                             "the state change; --syscalls names the call)")
            else:
                parts.append(f"this process called shutdown({SHUT_NAMES.get(h.shut_how, '?')}) "
                             f"{_ms(ago)} before this {ev.syscall}")
        if h and h.accept_ts and h.est_ts and h.accept_ts >= h.est_ts:
            queue_wait = h.accept_ts - h.est_ts
            details["accept_queue_wait_ms"] = round(queue_wait / 1e6, 3)
        elif h and h.unaccepted_at_fin and h.est_ts and h.close_wait_ts >= h.est_ts:
            details["accept_queue_wait_min_ms"] = round((h.close_wait_ts - h.est_ts) / 1e6, 3)
            if h.rst_ts > h.close_wait_ts:
                # the RST answered something we wrote, so accept() came before it
                details["accept_queue_wait_max_ms"] = round((h.rst_ts - h.est_ts) / 1e6, 3)
        if cause == "accepted_after_peer_closed" and h:
            if queue_wait is not None:
                before = h.accept_ts - h.close_wait_ts
                parts.append(f"the connection sat {_ms(queue_wait)} in the accept queue; "
                             f"{peer} closed it {_ms(before)} before accept() returned it "
                             "(already CLOSE_WAIT)")
            else:
                gave_up = h.close_wait_ts - h.est_ts if h.est_ts else 0
                wait = f"at least {_ms(gave_up)}"
                if "accept_queue_wait_max_ms" in details:
                    wait = (f"between {_ms(gave_up)} and {_ms(h.rst_ts - h.est_ts)} (the RST "
                            "that answered our write bounds it)")
                parts.append(f"{peer} closed the connection {_ms(gave_up)} after the "
                             "handshake while it still waited in the accept queue (CLOSE_WAIT "
                             f"before accept()): it waited {wait}")
        if h and h.rst_state:
            rst_err = {TCP_CLOSE_WAIT: "EPIPE", TCP_SYN_SENT: "ECONNREFUSED"}.get(
                h.rst_state, "ECONNRESET")
            parts.append(f"{peer} answered with a RST in {state_name(h.rst_state)} "
                         f"{_ms(ev.ts - h.rst_ts)} earlier, so the kernel set sk_err={rst_err}")
        elif cause == "connection_dead":
            if f.err_reported:
                parts.append(f"the kernel had reported {errname(f.err_reported)} on the socket")
            else:
                parts.append("the socket was already CLOSE without a RST seen")
        if f.err == -ECONNRESET:
            parts.append("this call consumed the pending ECONNRESET; the next send gets EPIPE")
        elif ev.path == "sk_stream_error":
            parts.append(f"sk_stream_error(err={errname(ev.err_at_hook)}) with "
                         f"sk_err={errname(ev.sk_err_at_hook)} returned {errname(ev.ret)}")
        if cause == "unknown":
            parts.append("no RST, shutdown or error was observed for this socket "
                         "(it may predate the trace)")
    elif f.kind == "unix":
        name = _clean_name(ev.name)
        who = f"peer pid {ev.peer_pid}" if ev.peer_pid else "the peer"
        if cause == "own_shutdown" and f.shut_how == 5:
            parts.append(f"our send side was shut down while {who} still had its end "
                         "open: our shutdown(SHUT_WR) (or the peer's SHUT_RD; --syscalls "
                         "tells which)")
        elif cause == "own_shutdown" and h:
            parts.append(f"this process called shutdown({SHUT_NAMES.get(h.shut_how, '?')}) "
                         f"{_ms(ev.ts - h.shut_ts)} earlier")
        elif h and h.peer_close_ts:
            parts.append(f"{who} ({h.peer_close_comm.decode('utf-8', 'replace')} pid "
                         f"{h.peer_close_pid}) closed its end {_ms(ev.ts - h.peer_close_ts)} "
                         "before this write (the peer closed first)")
        else:
            parts.append(f"{who} closed its end (the peer closed first)")
        if name:
            parts.append(f"socket {name}")
    elif f.kind in ("pipe", "fifo"):
        what = f"FIFO {ev.fifo_path}" if f.kind == "fifo" and ev.fifo_path else (
            "FIFO" if f.kind == "fifo" else "pipe")
        parts.append(f"the {what} (inode {ev.ino}) had no readers left")
        if ev.pipe_reader_pid:
            how = ("closed its read end" if ev.pipe_reader_how == 1 else
                   _exit_words(ev.pipe_reader_exit))
            parts.append(f"last reader {ev.pipe_reader_comm.decode('utf-8', 'replace')} "
                         f"(pid {ev.pipe_reader_pid}) {how} {_ms(ev.ts - ev.pipe_reader_ts)} "
                         "before this write")
    parts.append(f"SIGPIPE: {FATES[fate]}")
    return Verdict(cause, fate, "; ".join(parts), queue_wait, details)


def _exit_words(code: int) -> str:
    if code < 0:
        return "went away"
    sig = code & 0x7F
    if sig:
        return f"was killed by signal {sig}"
    return f"exited with status {(code >> 8) & 0xFF}"


def _clean_name(raw: bytes) -> str:
    if not raw:
        return ""
    if raw[:1] == b"\0":
        return "@" + raw[1:].split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
