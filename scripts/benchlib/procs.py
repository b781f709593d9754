"""Processes for the benchmark: the C workload, the tracer, strace.

Every wait has a timeout, and every process started here is stopped (first
politely, then SIGKILL) before the function that started it returns.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_MARK = "epipe-trace: tracing broken pipes"
HERE = Path(__file__).resolve().parent


class BenchError(Exception):
    """A run could not be completed (one line for the user)."""


def build_workload(tmpdir: str) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise BenchError("no C compiler (gcc) found; install it with 'apt-get install gcc'")
    out = os.path.join(tmpdir, "wl")
    r = subprocess.run([gcc, "-O2", "-Wall", "-o", out, str(HERE / "wl.c")],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"compiling {HERE / 'wl.c'} failed:\n{r.stderr.strip()}")
    return out


def ensure_strace(log) -> str | None:
    """Path of strace, installing it with apt-get when missing; None if impossible."""
    path = shutil.which("strace")
    if path:
        return path
    log("strace is not installed: installing it with 'apt-get install -y strace' "
        "(for the strace comparison column)...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", "strace"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "strace"]):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            break
        path = shutil.which("strace")
        if path:
            log(f"strace installed: {path}")
            return path
    log("strace could not be installed: the strace column will read n/a")
    return None


def read_status(pid: int) -> dict[str, int]:
    """VmHWM/VmRSS (kB) of a live process; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


_HZ = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    """utime+stime+cutime+cstime of a live process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / _HZ
    except (OSError, IndexError, ValueError):
        return None


def _kill(p: subprocess.Popen, grace: float = 3.0) -> None:
    if p.poll() is not None:
        return
    try:
        p.terminate()
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    except ProcessLookupError:
        pass


@dataclass
class TracerRun:
    """One tracer process: `python -m tracer --json ARGS`, cwd = the checkout."""
    python: str
    repo: str
    args: list[str]
    env: dict | None = None
    cmd: list[str] | None = None      # replaces `python -m tracer --json ARGS` (ablation)
    proc: subprocess.Popen | None = None
    t_start: float = 0.0
    ready_s: float | None = None
    cpu_ready_s: float | None = None   # the tool's CPU time (user+sys, + reaped children) at ready
    stderr_lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _out: object = None
    hwm_kb: int | None = None
    rss_kb: int | None = None
    stop_s: float | None = None
    exit_code: int | None = None
    summary: dict | None = None
    lost_lines: int = 0
    lost_line_total: int = 0
    fail_lines: int = 0
    stopped_by_itself: bool = False
    lost_lines_midrun: int | None = None

    def start(self) -> "TracerRun":
        self._out = tempfile.TemporaryFile(mode="w+b")
        env = dict(os.environ)
        env.pop("EPIPE_TRACE_DEBUG", None)
        if self.env:
            env.update(self.env)
        self.t_start = time.monotonic()
        cmd = self.cmd or [self.python, "-m", "tracer", "--json", *self.args]
        self.proc = subprocess.Popen(cmd,
                                     cwd=self.repo, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.PIPE, env=env)
        threading.Thread(target=self._read_err, daemon=True).start()
        return self

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if len(self.stderr_lines) < 200:
                self.stderr_lines.append(line)
            if not self._ready.is_set() and line.startswith(READY_MARK):
                self.ready_s = time.monotonic() - self.t_start
                self.cpu_ready_s = proc_cpu(self.proc.pid)
                self._ready.set()

    def wait_ready(self, timeout: float = 90.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._ready.wait(0.05):
                return self.ready_s
            if self.proc.poll() is not None:
                time.sleep(0.1)     # let the reader thread collect the message
                if self._ready.is_set():
                    return self.ready_s
                self.stop()
                raise BenchError("epipe-trace exited before it was ready (code "
                                 f"{self.proc.returncode}): "
                                 + " | ".join(self.stderr_lines[-5:]))
        self.stop()
        raise BenchError(f"epipe-trace was not ready after {timeout:.0f} s")

    def sample_memory(self) -> None:
        st = read_status(self.proc.pid)
        if st:
            self.hwm_kb = max(self.hwm_kb or 0, st.get("VmHWM", 0))
            self.rss_kb = st.get("VmRSS")

    def count_lost_lines_now(self) -> int:
        """{"event":"lost"} lines the tool has written so far (a live check)."""
        if self._out is None:
            return 0
        with open(f"/proc/self/fd/{self._out.fileno()}", "rb") as f:
            return sum(1 for line in f if line.startswith(b'{"event":"lost"'))

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 8.0) -> None:
        """Wait until the tool has stopped writing (it drains its ring buffer)."""
        end = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < end and self.proc.poll() is None:
            size = os.fstat(self._out.fileno()).st_size
            if size != last:
                last, since = size, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def wait_self_stop(self, timeout: float) -> bool:
        """For -p runs: the tool stops by itself once its targets exited."""
        try:
            self.proc.wait(timeout)
            self.stopped_by_itself = True
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float = 30.0) -> "TracerRun":
        p = self.proc
        if p is None:
            return self
        if p.poll() is None:
            self.sample_memory()
            t0 = time.monotonic()
            try:
                p.send_signal(signal.SIGINT)
                p.wait(timeout)
                self.stop_s = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                _kill(p)
        self.exit_code = p.returncode
        try:
            p.stderr.close()
        except OSError:
            pass
        self._parse_output()
        return self

    def _parse_output(self) -> None:
        if self._out is None:
            return
        self._out.seek(0)
        for raw in self._out:
            if not raw.startswith(b"{"):
                continue
            # cheap classification first: a storm can leave ~100k lines
            if raw.startswith(b'{"event":"broken_pipe"'):
                self.fail_lines += 1
                continue
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            ev = d.get("event")
            if ev == "summary":
                self.summary = d
            elif ev == "lost":
                self.lost_lines += 1
                self.lost_line_total += int(d.get("count", 0))
            elif ev == "broken_pipe":
                self.fail_lines += 1
        self._out.close()
        self._out = None

    def result(self) -> dict:
        s = self.summary or {}
        return {"args": self.args, "ready_s": self.ready_s, "cpu_ready_s": self.cpu_ready_s,
                "stop_s": self.stop_s,
                "vm_hwm_kb": self.hwm_kb, "vm_rss_kb": self.rss_kb,
                "exit_code": self.exit_code, "stopped_by_itself": self.stopped_by_itself,
                "summary_total": s.get("total"), "lost_events": s.get("lost_events"),
                "uncounted": s.get("uncounted"), "by_cause": s.get("by_cause"),
                "lost_lines": self.lost_lines, "lost_line_total": self.lost_line_total,
                "fail_lines": self.fail_lines, "summary_seen": self.summary is not None,
                "lost_lines_midrun": self.lost_lines_midrun}


class Workload:
    """The gated C workload (optionally under strace)."""

    def __init__(self, cmd: list[str], seconds: float):
        self.cmd = cmd
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def start(self) -> int:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        line = self._readline(30.0)
        if not line.startswith("READY "):
            err = self._drain_err()
            self.kill()
            raise BenchError(f"workload {' '.join(self.cmd[-3:])} did not start: {line!r} {err}")
        self.pid = int(line.split()[1])
        return self.pid

    def _readline(self, timeout: float) -> str:
        fd = self.proc.stdout.fileno()
        buf = b""
        end = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                break
            chunk = os.read(fd, 1)
            if not chunk:
                break
            buf += chunk
        return buf.decode("utf-8", "replace").strip()

    def _drain_err(self) -> str:
        try:
            r, _, _ = select.select([self.proc.stderr.fileno()], [], [], 0.5)
            if r:
                return os.read(self.proc.stderr.fileno(), 4096).decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            pass
        return ""

    def go(self) -> None:
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        line = self._readline(self.seconds * 4 + 30)
        try:
            res = json.loads(line)
        except ValueError:
            err = self._drain_err()
            self.kill()
            raise BenchError(f"workload gave no result: {line!r} {err}")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.close()
        return res

    def kill(self) -> None:
        if self.proc is not None:
            _kill(self.proc, 2.0)
            self.close()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except (OSError, BrokenPipeError):
                pass
