"""Broken-pipe scenarios on loopback, each in a process of its own.

Used by the integration tests and by ``epipe-trace repro``. Every scenario
runs a small Python program in a child process (so it has its own PID, its
own SIGPIPE disposition, and can be killed by SIGPIPE), which reports what
each send returned as JSON on stdout. Nothing leaves the machine: loopback
only, bounded in count and time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field

SCENARIO_VERSION = 2

_PRELUDE = r'''
import errno, json, os, signal, socket, sys, time
if os.environ.get("EPIPE_SCENARIO_GATE"):
    sys.stdin.readline()          # wait until the tracer is attached to our PID
RESULTS = {"sends": []}
def setup_sig(mode):
    if mode == "ignore":
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    elif mode == "handler":
        def h(s, f):
            RESULTS.setdefault("handler_ran", 0)
            RESULTS["handler_ran"] += 1
        signal.signal(signal.SIGPIPE, h)
    elif mode == "block":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    else:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
def record(op):
    """Run one write/send; record its byte count or errno name, and report it
    at once (a process killed by SIGPIPE never reaches done())."""
    try:
        RESULTS["sends"].append(op())
    except OSError as e:
        RESULTS["sends"].append(errno.errorcode.get(e.errno, str(e.errno)))
    sys.stdout.write(json.dumps({"progress": RESULTS["sends"][-1]}) + "\n"); sys.stdout.flush()
def send(sock, data, flags=0):
    record(lambda: sock.send(data, flags))
def done():
    RESULTS["pid"] = os.getpid()
    sys.stdout.write(json.dumps(RESULTS) + "\n"); sys.stdout.flush()
def listener(fam):
    af = socket.AF_INET6 if fam == 6 else socket.AF_INET
    s = socket.socket(af, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::1" if fam == 6 else "127.0.0.1", 0))
    s.listen(16)
    return s
'''

_BODIES = {
    # the seed's incident: peer connects and closes before we accept()
    "slow_accept": r'''
srv = listener(FAM)
t0 = time.monotonic()
c = socket.create_connection(srv.getsockname()[:2])
time.sleep(0.05)
c.close()
t_close = time.monotonic()
time.sleep(DELAY)
a, _ = srv.accept()
# the real time the connection waited in the accept queue, and when its peer
# gave up, as this process saw them
sys.stdout.write(json.dumps({"queue_wait_ms": (time.monotonic() - t0) * 1000,
                             "peer_closed_ms": (t_close - t0) * 1000}) + "\n")
for i in range(3):
    send(a, b"hello", FLAGS)
    time.sleep(0.1)
done()
''',
    # write after our own shutdown(SHUT_WR)
    "own_shutdown": r'''
srv = listener(FAM)
c = socket.create_connection(srv.getsockname()[:2])
a, _ = srv.accept()
send(a, b"first", FLAGS)
a.shutdown(socket.SHUT_WR)
time.sleep(0.05)
send(a, b"after shutdown", FLAGS)
done()
''',
    # peer closes with SO_LINGER 0: RST while ESTABLISHED
    "rst_established": r'''
import struct
srv = listener(FAM)
c = socket.create_connection(srv.getsockname()[:2])
a, _ = srv.accept()
send(a, b"first", FLAGS)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
time.sleep(0.1)
send(a, b"second", FLAGS)
time.sleep(0.05)
send(a, b"third", FLAGS)
done()
''',
    # UNIX stream pair: the peer closes, we write
    "unix_peer_closed": r'''
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
send(a, b"first", FLAGS)
b.close()
time.sleep(0.05)
send(a, b"after peer close", FLAGS)
done()
''',
    "unix_own_shutdown": r'''
a, b = socket.socketpair(socket.AF_UNIX, UNIX_TYPE)
a.shutdown(socket.SHUT_WR)
time.sleep(0.02)
send(a, b"after shutdown", FLAGS)
done()
''',
    # pipe whose reader exits after one line
    "pipe_reader_exits": r'''
import subprocess
r, w = os.pipe()
reader = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=r)
os.close(r)
RESULTS["reader_pid"] = reader.pid
sys.stdout.write(json.dumps({"reader_pid": reader.pid}) + "\n"); sys.stdout.flush()
for i in range(4):
    record(lambda: os.write(w, b"line %d\n" % i))
    if i == 0:
        reader.wait()
        time.sleep(0.02)
done()
''',
    # a FIFO in a temp dir, reader closes after one line
    "fifo_reader_exits": r'''
import subprocess, tempfile
d = tempfile.mkdtemp(prefix="epipe-fifo-")
path = os.path.join(d, "epipe.fifo")
os.mkfifo(path)
RESULTS["fifo"] = path
reader = subprocess.Popen([sys.executable, "-c",
    "import sys; f = open(sys.argv[1]); f.readline()", path])
RESULTS["reader_pid"] = reader.pid
w = os.open(path, os.O_WRONLY)
for i in range(3):
    record(lambda: os.write(w, b"line %d\n" % i))
    if i == 0:
        reader.wait()
        time.sleep(0.02)
time.sleep(0.5)   # keep the fd open while the tracer resolves its path
os.unlink(path); os.rmdir(d)
done()
''',
}


@dataclass
class Scenario:
    """One named run: body, address family, SIGPIPE disposition, send flags."""
    name: str
    body: str
    family: int = 4
    sig: str = "ignore"            # ignore | default | handler | block
    nosignal: bool = False
    unix_type: str = "SOCK_STREAM"   # UNIX bodies: SOCK_STREAM or SOCK_SEQPACKET
    delay: float = 0.3             # slow_accept: time in the accept queue after the close
    expect_cause: str | None = None
    expect_fate: str | tuple[str, ...] | None = None   # one, or any of several
    expect_kind: str = "tcp"

    def program(self) -> str:
        head = (f"FAM = {self.family}\nDELAY = {self.delay}\n"
                f"UNIX_TYPE = socket.{self.unix_type}\n"
                f"FLAGS = {'socket.MSG_NOSIGNAL' if self.nosignal else 0}\n"
                f"setup_sig({self.sig!r})\n")
        return _PRELUDE + head + textwrap.dedent(_BODIES[self.body])


@dataclass
class Outcome:
    scenario: str
    pid: int
    returncode: int
    sends: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def killed_by(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


# the fixed, versioned set `repro` runs; tests pick from it too
CATALOG: dict[str, Scenario] = {s.name: s for s in (
    Scenario("slow_accept", "slow_accept", expect_cause="accepted_after_peer_closed",
             expect_fate="ignored"),
    Scenario("slow_accept_ipv6", "slow_accept", family=6,
             expect_cause="accepted_after_peer_closed", expect_fate="ignored"),
    Scenario("own_shutdown", "own_shutdown", expect_cause="own_shutdown", expect_fate="ignored"),
    Scenario("rst_established", "rst_established", expect_cause="reset_while_established",
             expect_fate="ignored"),
    Scenario("nosignal", "rst_established", nosignal=True,
             expect_cause="reset_while_established", expect_fate="suppressed"),
    Scenario("sigpipe_default", "own_shutdown", sig="default", expect_cause="own_shutdown",
             expect_fate="fatal"),
    Scenario("sigpipe_handler", "own_shutdown", sig="handler", expect_cause="own_shutdown",
             expect_fate="caught"),
    Scenario("sigpipe_blocked", "own_shutdown", sig="block", expect_cause="own_shutdown",
             expect_fate="blocked"),
    Scenario("unix_peer_closed", "unix_peer_closed", expect_cause="peer_closed",
             expect_fate="ignored", expect_kind="unix"),
    Scenario("unix_own_shutdown", "unix_own_shutdown", expect_cause="own_shutdown",
             expect_fate="ignored", expect_kind="unix"),
    # the seqpacket send path returns EPIPE without raising SIGPIPE (seen on
    # 5.10, 6.1, 6.12 and 6.18): the fate must say so, not guess a signal
    Scenario("unix_seqpacket_own_shutdown", "unix_own_shutdown", unix_type="SOCK_SEQPACKET",
             expect_cause="own_shutdown", expect_fate="not_raised", expect_kind="unix"),
    Scenario("pipe_reader_exits", "pipe_reader_exits", sig="default", expect_cause="no_readers",
             expect_fate="fatal", expect_kind="pipe"),
    Scenario("pipe_ignored", "pipe_reader_exits", expect_cause="no_readers",
             expect_fate="ignored", expect_kind="pipe"),
    Scenario("fifo_reader_exits", "fifo_reader_exits", expect_cause="no_readers",
             expect_fate="ignored", expect_kind="fifo"),
)}


def start(sc: Scenario, gate: bool = False, python: str | None = None,
          comm: bytes | None = None) -> subprocess.Popen:
    """Start the scenario's process. With ``gate`` it waits for ``release()``
    so a tracer can be pointed at its PID before it does anything; ``comm``
    renames it first (PR_SET_NAME), for name filters and hostile names."""
    env = dict(os.environ)
    if gate:
        env["EPIPE_SCENARIO_GATE"] = "1"
    code = sc.program()
    if comm is not None:
        code = f"import ctypes; ctypes.CDLL(None).prctl(15, {comm!r}, 0, 0, 0)\n" + code
    return subprocess.Popen([python or sys.executable, "-c", code],
                            stdin=subprocess.PIPE if gate else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def finish(sc: Scenario, proc: subprocess.Popen, timeout: float = 30) -> Outcome:
    if proc.stdin:
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.stdin = None
    out, _err = proc.communicate(timeout=timeout)
    sends, extra = [], {}
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if "progress" in d:
            sends.append(d["progress"])
        else:
            extra.update(d)
            sends = d.get("sends", sends)
    return Outcome(sc.name, proc.pid, proc.returncode, sends,
                   {k: v for k, v in extra.items() if k not in ("sends", "pid")})


def run(sc: Scenario, timeout: float = 30) -> Outcome:
    return finish(sc, start(sc), timeout)
