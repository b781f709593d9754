"""Shared fixtures: a real epipe-trace process attached to the real kernel."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="loads BPF programs: run the tests as root")
        for item in items:
            if "bpf" in item.keywords:
                item.add_marker(skip)


class Tracer:
    """`python -m tracer ARGS` in the background, ready once it says 'tracing'."""

    def __init__(self, args: list[str], json_mode: bool = True, env: dict | None = None):
        self.args = (["--json"] if json_mode else []) + args
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "tracer", *self.args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.stderr_lines: list[str] = []
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rest = self.proc.stderr.read().decode()
                raise AssertionError(f"tracer exited early ({self.proc.returncode}): {buf.decode()}{rest}")
            r, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if r:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                buf += chunk
                if b"tracing broken pipes" in buf:
                    self.stderr_lines = buf.decode().splitlines()
                    return
        self.proc.kill()
        raise AssertionError(f"tracer not ready after {timeout}s: {buf.decode()}")

    def stop(self, sig=signal.SIGINT, timeout: float = 30) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            time.sleep(0.3)   # let the last events reach the ring buffer
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def stop_json(self, sig=signal.SIGINT) -> tuple[int, list[dict], str]:
        rc, out, err = self.stop(sig)
        objs = [json.loads(line) for line in out.splitlines() if line.strip()]
        return rc, objs, err


@pytest.fixture
def tracer():
    started: list[Tracer] = []

    def _start(*args: str, json_mode: bool = True, env: dict | None = None) -> Tracer:
        t = Tracer(list(args), json_mode, env)
        started.append(t)
        return t

    yield _start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def gated_python(code: str) -> subprocess.Popen:
    """A Python child running ``code``, which starts with sys.stdin.readline():
    it waits there until tracer.scenarios.release() lets it go."""
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def our_prog_ids() -> set[int]:
    """BPF programs loaded right now whose names are ours."""
    out = subprocess.run(["bpftool", "prog", "list", "--json"], capture_output=True, text=True)
    ids = set()
    for p in json.loads(out.stdout or "[]"):
        name = p.get("name", "")
        if name.startswith(("tracepoint__", "raw_tracepoint_", "kprobe__", "kfunc__")):
            ids.add(p["id"])
    return ids
