"""UNIX sockets, pipes and FIFOs on the real kernel."""
from __future__ import annotations

import signal

import pytest

from tracer import scenarios

from .conftest import Tracer, gated_python
from .test_trace_tcp import run_traced

pytestmark = pytest.mark.bpf


def test_pipe_reader_exits_producer_killed(tracer):
    outcome, fails, objs = run_traced(tracer, "pipe_reader_exits")
    assert outcome.killed_by == signal.SIGPIPE
    f = fails[0]
    assert f["kind"] == "pipe" and f["cause"] == "no_readers" and f["sigpipe"] == "fatal"
    assert f["syscall"] == "write" and f["readers"] == 0
    assert f["last_reader"]["how"] == "exited" and f["last_reader"]["comm"].startswith("python")
    assert f["last_reader"]["pid"] == outcome.extra["reader_pid"]
    assert any(o["event"] == "killed_by_sigpipe" and o["pid"] == outcome.pid for o in objs)


def test_pipe_with_sigpipe_ignored(tracer):
    outcome, fails, _ = run_traced(tracer, "pipe_ignored")
    assert outcome.sends[0] == 7 and outcome.sends[1:] == ["EPIPE"] * 3
    assert len(fails) == 3
    assert {f["sigpipe"] for f in fails} == {"ignored"}
    assert fails[0]["last_reader"]["pid"] == outcome.extra["reader_pid"]


@pytest.mark.parametrize("mode", ["default", "syscalls"])
def test_fifo_named(tracer, mode):
    outcome, fails, _ = run_traced(tracer, "fifo_reader_exits",
                                   ["--syscalls"] if mode == "syscalls" else [])
    assert outcome.sends[1:] == ["EPIPE", "EPIPE"]
    assert fails[0]["kind"] == "fifo" and fails[0]["name"] == "epipe.fifo"
    assert fails[0]["path"] == outcome.extra["fifo"]
    if mode == "syscalls":
        # the reader's Python closes the FIFO before it exits: only the close()
        # hook sees who that was
        assert fails[0]["last_reader"]["pid"] == outcome.extra["reader_pid"]
        assert fails[0]["last_reader"]["how"] == "closed"
    else:
        assert fails[0]["last_reader"] is None          # not seen, and not made up
        assert "last reader" not in fails[0]["explanation"]


def test_unix_peer_closed(tracer):
    outcome, fails, _ = run_traced(tracer, "unix_peer_closed")
    assert outcome.sends == [5, "EPIPE"]
    assert fails[0]["kind"] == "unix" and fails[0]["cause"] == "peer_closed"
    assert fails[0]["peer_pid"] == outcome.pid          # socketpair: we are both ends
    assert "closed its end" in fails[0]["explanation"]


def test_unix_own_shutdown(tracer):
    _, fails, _ = run_traced(tracer, "unix_own_shutdown")
    assert [f["cause"] for f in fails] == ["own_shutdown"]


def test_unix_seqpacket_own_shutdown(tracer):
    outcome, fails, _ = run_traced(tracer, "unix_seqpacket_own_shutdown")
    assert outcome.sends == ["EPIPE"]
    assert [(f["kind"], f["cause"]) for f in fails] == [("unix", "own_shutdown")]
    # the seqpacket path fails the send without raising SIGPIPE, and the
    # signal hook is attached: so no SIGPIPE, rather than an unknown fate
    assert fails[0]["sigpipe"] == "not_raised"


def test_type_filter(tracer):
    """--type tcp hides the pipe's EPIPE in the kernel: not shown, not counted."""
    sc = scenarios.CATALOG["pipe_ignored"]
    proc = scenarios.start(sc, gate=True)
    t = tracer("-p", str(proc.pid), "--type", "tcp")
    scenarios.release(proc)
    assert "EPIPE" in scenarios.finish(sc, proc).sends
    rc, objs, _ = t.stop_json()
    assert [o["event"] for o in objs] == ["summary"] and objs[0]["total"] == 0


FILTERED_THEN_UNIX = r"""
import errno, signal, socket, sys
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
sys.stdin.readline()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname())
c.shutdown(socket.SHUT_WR)
try:
    c.send(b"x")                     # TCP: EPIPE, and a SIGPIPE (ignored)
except OSError as e:
    assert e.errno == errno.EPIPE
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.shutdown(socket.SHUT_WR)
try:
    a.send(b"y")                     # UNIX seqpacket: EPIPE, no SIGPIPE raised
except OSError as e:
    assert e.errno == errno.EPIPE
print("done", flush=True)
"""


def test_a_filtered_out_failure_leaves_nothing_for_the_next_one():
    """--type unix drops the TCP failure; its SIGPIPE record must go with it,
    not be joined to the UNIX failure that follows on the same thread."""
    proc = gated_python(FILTERED_THEN_UNIX)
    t = Tracer(["-p", str(proc.pid), "--type", "unix"])
    scenarios.release(proc)
    assert proc.communicate(timeout=30)[0].strip() == "done"
    rc, objs, err = t.stop_json()
    assert rc == 0, err
    fails = [o for o in objs if o["event"] == "broken_pipe"]
    assert [(f["kind"], f["cause"]) for f in fails] == [("unix", "own_shutdown")]
    assert fails[0]["sigpipe"] == "not_raised"       # not the TCP send's "ignored"
