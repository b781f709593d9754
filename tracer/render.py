"""Render verdicts for people (aligned lines, timelines, summary tables) and for
machines (newline-delimited JSON). Strings that come from the traced system
(process names, paths) are untrusted: escaped in the table, encoded faithfully
in JSON.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from tabulate import tabulate

from .events import TCP_STATES, DeliverEvent, Endpoint, ExitEvent, Facts, FailEvent
from .explain import CAUSES, FATES, SHUT_NAMES, Verdict, classify, errname, sigpipe_fate

# --- untrusted strings -------------------------------------------------------------


def escape(raw: bytes | str) -> str:
    """Printable, one-line text: control bytes and invalid UTF-8 as \\xNN."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    raw = raw.split(b"\0", 1)[0]
    out = []
    text = raw.decode("utf-8", "surrogateescape")
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:                 # an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def json_string(raw: bytes) -> dict:
    """A field for JSON: the text, and the exact bytes when the text is lossy."""
    raw = raw.split(b"\0", 1)[0]
    try:
        return {"text": raw.decode("utf-8"), "hex": None}
    except UnicodeDecodeError:
        return {"text": raw.decode("utf-8", "replace"), "hex": raw.hex()}


# --- clocks ------------------------------------------------------------------------

@dataclass
class Clock:
    """Turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) into wall or relative time."""
    start_mono_ns: int = field(default_factory=time.monotonic_ns)
    wall_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def wall(self, ts_ns: int) -> float:
        return ts_ns / 1e9 + self.wall_offset

    def hms(self, ts_ns: int) -> str:
        return _dt.datetime.fromtimestamp(self.wall(ts_ns)).strftime("%H:%M:%S.%f")[:-3]

    def rel(self, ts_ns: int) -> str:
        return f"{(ts_ns - self.start_mono_ns) / 1e9:.6f}"


# --- one line per event ----------------------------------------------------------------

COLUMNS = [("PID", 7), ("COMM", 15), ("FD", 4), ("LOCAL", 23), ("REMOTE", 23),
           ("SYSCALL", 8), ("ERROR", 10), ("CAUSE", 42), ("SIGPIPE", 0)]


def _endpoints(ev: FailEvent) -> tuple[str, str]:
    k = ev.facts.kind
    if k == "tcp":
        return ev.endpoint.local(), ev.endpoint.remote()
    if k == "unix":
        name = ev.name.split(b"\0", 1)[0] if ev.name[:1] != b"\0" else b"@" + ev.name[1:].split(b"\0", 1)[0]
        return (f"unix:{escape(name)}" if name else "unix"), (f"peer pid {ev.peer_pid}" if ev.peer_pid else "peer")
    if k in ("pipe", "fifo"):
        local = f"{k}:[{ev.ino}]" if k == "pipe" else f"fifo:{escape(ev.fifo_path or ev.name)}"
        reader = f"reader pid {ev.pipe_reader_pid}" if ev.pipe_reader_pid else "no readers"
        return local, reader
    return k, "-"


class TableRenderer:
    def __init__(self, out, clock: Clock, time_mode: str | None = None,
                 timeline: bool = False, show_sentence: bool = True):
        self.out, self.clock, self.time_mode = out, clock, time_mode
        self.timeline, self.show_sentence = timeline, show_sentence

    def _fmt(self, cells: list[str], first: str | None) -> str:
        parts = []
        if self.time_mode:
            parts.append((first or "").ljust(15 if self.time_mode == "time" else 12))
        for (name, width), cell in zip(COLUMNS, cells):
            parts.append(cell.ljust(width) if width else cell)
        return " ".join(parts).rstrip()

    def header(self) -> None:
        head = "TIME" if self.time_mode == "time" else "TIME(s)"
        self.out.write(self._fmt([c for c, _ in COLUMNS], head if self.time_mode else None) + "\n")
        self.out.flush()

    def _time(self, ts: int) -> str | None:
        if self.time_mode == "time":
            return self.clock.hms(ts)
        if self.time_mode == "timestamp":
            return self.clock.rel(ts)
        return None

    def fail(self, ev: FailEvent, v: Verdict, stack_lines: list[str] | None = None) -> None:
        local, remote = _endpoints(ev)
        cells = [str(ev.pid), escape(ev.comm), str(ev.fd), local, remote, ev.syscall,
                 errname(ev.ret), CAUSES[v.cause], FATES[v.fate]]
        lines = [self._fmt(cells, self._time(ev.ts))]
        if self.show_sentence:
            lines.append(f"    why: {escape(v.sentence)}")
        if self.timeline:
            lines.extend("    " + ln for ln in timeline_lines(ev, self.clock))
        for ln in stack_lines or []:
            lines.append("    " + ln)
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def killed(self, ev: ExitEvent) -> None:
        cells = [str(ev.pid), escape(ev.comm), "-", "-", "-", "-", "-",
                 "process killed by SIGPIPE", f"exit code {ev.exit_code}"]
        self.out.write(self._fmt(cells, self._time(ev.ts)) + "\n")
        self.out.flush()

    def delivered(self, ev: DeliverEvent) -> None:
        pass   # the fail line already said "caught"; the summary counts deliveries

    def lost(self, n: int) -> None:
        self.out.write(f"WARNING: {n} event(s) lost (ring buffer full); summary counts stay exact\n")
        self.out.flush()


def timeline_lines(ev: FailEvent, clock: Clock) -> list[str]:
    """The socket's history, oldest first, times relative to the failure."""
    h = ev.history
    if h is None:
        return ["(no history recorded for this socket: it may predate the trace)"]
    items: list[tuple[int, str]] = []
    for s in h.states:
        items.append((s.ts, f"{TCP_STATES.get(s.old, s.old)} -> {TCP_STATES.get(s.new, s.new)}"))
    if h.states_dropped:
        items.append((h.states[0].ts - 1 if h.states else 0,
                      f"({h.states_dropped} earlier state change(s) not kept)"))
    if h.accept_ts:
        items.append((h.accept_ts, f"accept() returned it to pid {h.accept_pid}"))
    if h.rst_ts:
        items.append((h.rst_ts, f"RST received in {TCP_STATES.get(h.rst_state, h.rst_state)}"))
    if h.err_ts:
        items.append((h.err_ts, f"error reported: sk_err={errname(h.err_reported)}"))
    if h.shut_ts:
        items.append((h.shut_ts, f"shutdown({SHUT_NAMES.get(h.shut_how, '?')}) by pid {h.shut_pid}"))
    if h.peer_close_ts:
        items.append((h.peer_close_ts, f"peer closed (pid {h.peer_close_pid} "
                                       f"{escape(h.peer_close_comm)})"))
    items.append((ev.ts, f"{ev.syscall}() -> {errname(ev.ret)}"
                         + (f" via {ev.path}" if ev.path else "")))
    items.sort(key=lambda x: x[0])
    return [f"{(ts - ev.ts) / 1e6:+10.3f} ms  {what}" for ts, what in items if ts]


# --- JSON -----------------------------------------------------------------------------

def fail_json(ev: FailEvent, v: Verdict, clock: Clock, stack: dict | None = None) -> dict:
    comm = json_string(ev.comm)
    d = {
        "event": "broken_pipe",
        "time": round(clock.wall(ev.ts), 6),
        "pid": ev.pid, "tid": ev.tid, "comm": comm["text"], "comm_hex": comm["hex"],
        "fd": ev.fd, "syscall": ev.syscall, "ret": ev.ret, "error": errname(ev.ret),
        "kind": ev.facts.kind,
        "cause": v.cause, "cause_text": CAUSES[v.cause],
        "sigpipe": v.fate, "sigpipe_text": FATES[v.fate],
        "explanation": v.sentence,
        "msg_nosignal": ev.facts.nosignal,
        "kernel_path": ev.path,
        "err_at_hook": errname(ev.err_at_hook) if ev.path else None,
        # only sk_stream_error sees sk_err before sock_error() consumes it
        "sk_err_at_hook": errname(ev.sk_err_at_hook) if ev.path == "sk_stream_error" else None,
    }
    if ev.facts.kind == "tcp":
        ep = ev.endpoint
        d.update({
            "family": {2: "ipv4", 10: "ipv6"}.get(ep.family, ep.family),
            "local": {"addr": ep.laddr, "port": ep.lport},
            "remote": {"addr": ep.raddr, "port": ep.rport},
            "state_now": TCP_STATES.get(ev.facts.state_now, ev.facts.state_now),
            "bytes_sent": ev.bytes_sent, "bytes_acked": ev.bytes_acked,
            "bytes_received": ev.bytes_received,
        })
    elif ev.facts.kind == "unix":
        name = json_string(ev.name if ev.name[:1] != b"\0" else b"@" + ev.name[1:])
        d.update({"unix_name": name["text"], "unix_name_hex": name["hex"],
                  "peer_pid": ev.peer_pid or None})
    elif ev.facts.kind in ("pipe", "fifo"):
        name = json_string(ev.name)
        d.update({"inode": ev.ino, "name": name["text"], "name_hex": name["hex"],
                  "path": ev.fifo_path,
                  "readers": ev.pipe_readers, "writers": ev.pipe_writers,
                  "last_reader": ({"pid": ev.pipe_reader_pid,
                                   "comm": json_string(ev.pipe_reader_comm)["text"],
                                   "how": {1: "closed", 2: "exited"}.get(ev.pipe_reader_how),
                                   "exit_code": ev.pipe_reader_exit if ev.pipe_reader_how == 2 else None,
                                   "ms_before": round((ev.ts - ev.pipe_reader_ts) / 1e6, 3)}
                                  if ev.pipe_reader_pid else None)})
    if v.details:
        d.update(v.details)
    h = ev.history
    if h is not None:
        d["history"] = {
            "states": [{"ms": round((s.ts - ev.ts) / 1e6, 3),
                        "from": TCP_STATES.get(s.old, s.old), "to": TCP_STATES.get(s.new, s.new)}
                       for s in h.states],
            "states_dropped": h.states_dropped,
            "rst": ({"ms": round((h.rst_ts - ev.ts) / 1e6, 3),
                     "state": TCP_STATES.get(h.rst_state, h.rst_state)} if h.rst_ts else None),
            "shutdown": ({"ms": round((h.shut_ts - ev.ts) / 1e6, 3),
                          "how": SHUT_NAMES.get(h.shut_how), "pid": h.shut_pid}
                         if h.shut_ts else None),
            "accept": ({"ms": round((h.accept_ts - ev.ts) / 1e6, 3), "pid": h.accept_pid}
                       if h.accept_ts else None),
            "fin_before_accept": h.unaccepted_at_fin,
            "error_reported": errname(h.err_reported) if h.err_ts else None,
        }
    if stack is not None:
        d["stack"] = stack
    return d


def killed_json(ev: ExitEvent, clock: Clock) -> dict:
    c = json_string(ev.comm)
    return {"event": "killed_by_sigpipe", "time": round(clock.wall(ev.ts), 6), "pid": ev.pid,
            "comm": c["text"], "comm_hex": c["hex"], "exit_code": ev.exit_code}


def delivered_json(ev: DeliverEvent, clock: Clock) -> dict:
    c = json_string(ev.comm)
    return {"event": "sigpipe_delivered", "time": round(clock.wall(ev.ts), 6), "pid": ev.pid,
            "tid": ev.tid, "comm": c["text"], "comm_hex": c["hex"],
            "handler": hex(ev.handler)}


def dumps(d: dict) -> str:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


# --- the summary ------------------------------------------------------------------------

@dataclass
class Summary:
    by_cause: Counter
    by_fate: Counter
    by_remote: Counter
    total: int
    lost: int
    killed: int
    counter_overflow: int
    remote_overflow: int = 0

    def to_dict(self) -> dict:
        return {"event": "summary", "total": self.total, "lost_events": self.lost,
                "killed_by_sigpipe": self.killed, "uncounted": self.counter_overflow,
                "remote_uncounted": self.remote_overflow,
                "by_cause": dict(self.by_cause), "by_sigpipe": dict(self.by_fate),
                "by_remote": {k: v for k, v in self.by_remote.most_common()}}


REMOTE_TABLE_FULL = "(other endpoints: table full)"


def _remote_name(facts: Facts, ep: Endpoint) -> str:
    if facts.kind != "tcp":
        return facts.kind
    if ep.rport:
        return ep.remote()
    return f"{ep.raddr} (clients)"       # accepted: any source port


def summarize(counts: list[tuple[Facts, Endpoint, int]], stats: list[int],
              sig_observed: bool = True,
              remote_counts: list[tuple[Facts, Endpoint, int]] | None = None) -> Summary:
    """Causes and fates from the exact counters (keyed by facts only); remote
    endpoints from the second, best-effort table, whose shortfall when it
    filled up is shown as one bucket so the column still adds up."""
    by_cause: Counter = Counter()
    by_fate: Counter = Counter()
    by_remote: Counter = Counter()
    for facts, ep, n in counts:
        by_cause[classify(facts)] += n
        by_fate[sigpipe_fate(facts, sig_observed)] += n
    total = sum(by_cause.values())
    for facts, ep, n in (counts if remote_counts is None else remote_counts):
        by_remote[_remote_name(facts, ep)] += n
    missing = total - sum(by_remote.values())
    if missing > 0:
        by_remote[REMOTE_TABLE_FULL] += missing
    return Summary(by_cause, by_fate, by_remote, total,
                   lost=stats[1], killed=stats[4], counter_overflow=stats[2],
                   remote_overflow=stats[6])


def summary_text(s: Summary) -> str:
    if s.total == 0 and not s.counter_overflow:
        return "No broken pipes seen.\n"
    out = [f"\n{s.total} failing send(s) with EPIPE/ECONNRESET"
           + (f"; {s.lost} event line(s) lost, counts below are exact" if s.lost else "")
           + (f"; {s.counter_overflow} not counted (counter table full)" if s.counter_overflow else "")
           + (f"; {s.killed} process(es) killed by SIGPIPE" if s.killed else "")]
    out.append(tabulate([(CAUSES[c], c, n) for c, n in s.by_cause.most_common()],
                        headers=["CAUSE", "ID", "COUNT"], tablefmt="simple"))
    out.append("")
    out.append(tabulate([(FATES[f], n) for f, n in s.by_fate.most_common()],
                        headers=["SIGPIPE", "COUNT"], tablefmt="simple"))
    out.append("")
    out.append(tabulate(s.by_remote.most_common(20), headers=["REMOTE", "COUNT"],
                        tablefmt="simple"))
    return "\n".join(out) + "\n"
