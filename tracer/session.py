"""One tracing session: wire the steps together and own the exit paths.

capabilities -> header tree -> plan -> load -> (poll, decode, explain, render)
-> summary. Every way out (Ctrl-C, SIGTERM, SIGHUP, --duration, all -p targets
gone, stdout closed, an exception in the event callback) goes through one
``finally`` that detaches everything.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from . import bpfsys, capabilities, headers
from .events import DeliverEvent, ExitEvent, FailEvent, RawEvent, decode, decode_count_key
from .explain import explain
from .loader import Loaded, load
from .plan import UNAVAILABLE, ProbePlan, make_plan
from .program import Filters, ProgramOptions, source_text, syscall_names
from .render import (Clock, TableRenderer, delivered_json, dumps, fail_json, killed_json,
                     summarize, summary_text)


_PROBE_FRAMES = ("bpf_prog_", "bpf_trace_run", "__traceiter_", "__bpf_trace_", "perf_trace_",
                 "kprobe_", "bpf_trampoline_")


class TargetsGone(Exception):
    """Every -p target exited while the probes were being loaded."""

    def __init__(self, pids):
        super().__init__(", ".join(map(str, pids)))
        self.pids = pids


class Stop(Exception):
    """Raised inside the loop to end the session normally."""


@dataclass
class SessionOptions:
    filters: Filters
    program: ProgramOptions = field(default_factory=ProgramOptions)
    json: bool = False
    time_mode: str | None = None
    timeline: bool = False
    duration: float | None = None
    prefer: str | None = None
    syscalls: bool = False          # report at syscall exit, add accept/shutdown/close hooks
    header_source: str = "auto"
    quiet_summary: bool = False


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[0:1]
    return state not in ([b"Z"], [b"X"])


def prepare(opts: SessionOptions) -> tuple[capabilities.KernelCapabilities, headers.HeaderTree, ProbePlan]:
    caps = capabilities.detect()
    tree = headers.prepare(caps, prefer=opts.header_source, roots_text=source_text())
    plan = make_plan(caps, prefer=opts.prefer, syscalls=opts.syscalls)
    return caps, tree, plan


class Session:
    def __init__(self, opts: SessionOptions, out=None, err=None):
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.clock = Clock()
        self.loaded: Loaded | None = None
        self.callback_error: BaseException | None = None
        self.stop_reason: str | None = None
        self.lost_reported = 0
        self.syscalls = syscall_names()
        self.renderer = TableRenderer(self.out, self.clock, opts.time_mode, opts.timeline)
        self.events_seen = 0
        self.sig_observed = True
        self._stop_requested: str | None = None
        self._poll_events = 0
        self._poll_started = 0.0
        self._poll_cut = False
        self._draining = False
        self._attached = False
        self._symbols = None             # bpfsys.Symbols, made on the first --stack event

    def request_stop(self, reason: str) -> None:
        """Ask the loop to end at its next turn (safe from another thread)."""
        self._stop_requested = reason

    # -- the callback: never let an exception vanish into ctypes --
    # One poll hands back control after this much work, so that during an
    # EPIPE storm (the producer outpacing us) Ctrl-C, --duration and the live
    # "lost" count are still served. A negative return makes libbpf stop
    # consuming; the record it was called for is already consumed.
    POLL_BUDGET_EVENTS = 4096
    POLL_BUDGET_SECONDS = 0.25

    def _on_event(self, ctx, data, size):
        try:
            self._handle(decode(data, size, self.syscalls))
        except BaseException as e:   # noqa: BLE001 (re-raised from the loop)
            self.callback_error = e
            return -1
        self._poll_events += 1
        if self._poll_events >= self.POLL_BUDGET_EVENTS or (
                self._stop_requested and not self._draining) or (
                self._poll_events % 256 == 0 and
                time.monotonic() - self._poll_started > self.POLL_BUDGET_SECONDS):
            self._poll_cut = True
            return -1
        return 0

    def _poll(self, timeout_ms: int | None) -> None:
        """One poll; None: consume what is there without waiting."""
        self._poll_events = 0
        self._poll_cut = False
        self._poll_started = time.monotonic()
        if timeout_ms is None:
            self.loaded.ring.consume()
        else:
            self.loaded.ring.poll(timeout_ms)

    def _drain(self, seconds: float = 0.5) -> None:
        """Read what the ring buffer holds now: at most its capacity in records
        (a storm may go on after Ctrl-C; what it adds later is in the counts).

        Consumes directly instead of polling: the kernel wakes the reader only
        when it had caught up, so after a storm the last records can sit in
        the buffer with no wake-up pending, and a zero-timeout poll would
        leave them there (seen as one event neither shown nor counted lost)."""
        capacity = self.opts.program.ringbuf_pages * 4096 // (ctypes.sizeof(RawEvent) + 8) + 1
        deadline = time.monotonic() + seconds
        taken = 0
        self._draining = True
        try:
            while True:
                self._poll(None)
                taken += self._poll_events
                if not self._poll_cut or taken >= capacity or time.monotonic() >= deadline:
                    break
        finally:
            self._draining = False

    def _stack(self, ev: FailEvent) -> tuple[list[str], dict | None]:
        if not self.opts.program.stacks or self.loaded is None:
            return [], None
        if self._symbols is None:
            self._symbols = bpfsys.Symbols()
        sym = self._symbols
        kframes, uframes = [], []
        if ev.kstack >= 0:
            kframes = [sym.resolve(a) for a in self.loaded.stack(ev.kstack)]
            # the top frames are our own probe and the tracing glue: not the story
            while kframes and kframes[0].startswith(_PROBE_FRAMES):
                kframes.pop(0)
        if ev.ustack >= 0:
            uframes = [sym.resolve(a, ev.pid, show_module=True)
                       for a in self.loaded.stack(ev.ustack)]
        lines = [f"kernel: {f}" for f in kframes] + [f"user:   {f}" for f in uframes]
        return lines, {"kernel": kframes, "user": uframes}

    @staticmethod
    def _resolve_fifo(ev: FailEvent) -> None:
        """The kernel side only has the FIFO's last path component; the full
        path comes from /proc/PID/fd/FD while the writer still has it open."""
        try:
            target = os.readlink(f"/proc/{ev.pid}/fd/{ev.fd}")
            st = os.stat(f"/proc/{ev.pid}/fd/{ev.fd}")
        except OSError:
            return
        if st.st_ino == ev.ino and not target.startswith("pipe:"):
            ev.fifo_path = target

    def _handle(self, ev) -> None:
        self.events_seen += 1
        if isinstance(ev, FailEvent):
            if ev.facts.kind == "fifo":
                self._resolve_fifo(ev)
            v = explain(ev, self.sig_observed)
            lines, stack = self._stack(ev)
            if self.opts.json:
                self._write(dumps(fail_json(ev, v, self.clock, stack)))
            else:
                self.renderer.fail(ev, v, lines)
        elif isinstance(ev, ExitEvent):
            if self.opts.json:
                self._write(dumps(killed_json(ev, self.clock)))
            else:
                self.renderer.killed(ev)
        elif isinstance(ev, DeliverEvent):
            if self.opts.json:
                self._write(dumps(delivered_json(ev, self.clock)))

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def _check_lost(self) -> None:
        lost = self.loaded.stats()[1]
        if lost > self.lost_reported:
            n = lost - self.lost_reported
            self.lost_reported = lost
            if self.opts.json:
                self._write(dumps({"event": "lost", "count": n, "total_lost": lost}))
            else:
                self.renderer.lost(n)

    def run(self, plan: ProbePlan, tree: headers.HeaderTree, ready_cb=None) -> int:
        """Trace until a stop condition; returns the exit code."""
        opts = self.opts

        def _term(signum, frame):
            name = "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name
            if self._attached:
                # never raise in the middle of handling an event (its line
                # would be lost): the loop stops after the current poll
                self.request_stop(name)
            else:
                raise Stop(name)

        self.sig_observed = plan.by_name("sigpipe_generated").mechanism != UNAVAILABLE
        old = {s: signal.signal(s, _term) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.loaded = load(tree, plan, opts.filters, opts.program)
            if opts.filters.pids and not any(pid_alive(p) for p in opts.filters.pids):
                raise TargetsGone(opts.filters.pids)
            self.loaded.open_ring_buffer(self._on_event)
            self._attached = True
            if ready_cb:
                ready_cb(self)
            if not opts.json:
                self.renderer.header()
            deadline = time.monotonic() + opts.duration if opts.duration else None
            targets = list(opts.filters.pids)
            while True:
                self._poll(200)
                if self.callback_error is not None:
                    raise self.callback_error
                self._check_lost()
                if self._stop_requested:
                    raise Stop(self._stop_requested)     # _finish drains
                if deadline and time.monotonic() >= deadline:
                    raise Stop("duration")
                if targets and not any(pid_alive(p) for p in targets):
                    # drain what the last moments produced, then stop
                    self._drain()
                    if self.callback_error is not None:
                        raise self.callback_error
                    raise Stop("targets exited")
        except (Stop, KeyboardInterrupt) as e:
            self.stop_reason = str(e) or "interrupted"
            return self._finish()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.loaded is not None and self.stop_reason is None:
                self.loaded.detach()

    def _finish(self) -> int:
        # once stopping, a second Ctrl-C/SIGTERM must not cut the summary or,
        # worse, the detach in half
        ignored = {s: signal.signal(s, signal.SIG_IGN)
                   for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if self.loaded is not None:
                try:
                    self._drain()
                    self._check_lost()      # the last losses, as a live line too
                except Exception:
                    pass
                raw = self.loaded.counts()
                stats = self.loaded.stats()
                counts = [(*decode_count_key(k), n) for k, n in raw]
                remote = [(*decode_count_key(k), n)
                          for k, n in self.loaded.counts("counts_remote")]
                summ = summarize(counts, stats, self.sig_observed, remote)
                if not self.opts.quiet_summary:
                    if self.opts.json:
                        d = summ.to_dict()
                        d["stop"] = self.stop_reason
                        c = self.loaded.compiled
                        # how this run got its program: scripts/bench reads it
                        d["program"] = {"compiled": "cached" if c.cached else "now",
                                        "compile_seconds": round(c.compile_seconds, 3),
                                        "compile_helper_peak_kb": c.helper_peak_kb}
                        self._write(dumps(d))
                    else:
                        self.out.write(summary_text(summ))
                        self.out.flush()
            return 0
        finally:
            if self.loaded is not None:
                self.loaded.detach()
            for s, h in ignored.items():
                signal.signal(s, h)
