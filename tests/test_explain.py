"""Unit tests: cause and SIGPIPE fate from hand-built facts and events."""
from __future__ import annotations

import pytest

from tracer.events import NOSIG, Endpoint, Facts, FailEvent, SocketHistory, StateChange
from tracer.explain import classify, explain, sigpipe_fate

EPIPE, ECONNRESET = -32, -104
CLOSE_WAIT, ESTABLISHED, SYN_SENT, CLOSE = 8, 1, 2, 7


@pytest.mark.parametrize("facts,cause", [
    (Facts("tcp", EPIPE, rst_state=CLOSE_WAIT, has_hist=True), "peer_reset_after_close"),
    (Facts("tcp", EPIPE, rst_state=CLOSE_WAIT, accepted_after_close=True, has_hist=True),
     "accepted_after_peer_closed"),
    (Facts("tcp", ECONNRESET, rst_state=ESTABLISHED, has_hist=True), "reset_while_established"),
    (Facts("tcp", EPIPE, rst_state=ESTABLISHED, has_hist=True), "reset_while_established"),
    (Facts("tcp", EPIPE, rst_state=SYN_SENT, has_hist=True), "reset_while_connecting"),
    (Facts("tcp", EPIPE, shut_how=2, has_hist=True), "own_shutdown"),
    (Facts("tcp", EPIPE, shut_how=3, rst_state=CLOSE_WAIT, has_hist=True), "own_shutdown"),
    (Facts("tcp", EPIPE, shut_how=1, rst_state=CLOSE_WAIT, has_hist=True),
     "peer_reset_after_close"),                      # SHUT_RD does not stop sends
    (Facts("tcp", EPIPE, err_reported=110, state_now=CLOSE, has_hist=True), "connection_dead"),
    (Facts("tcp", EPIPE, state_now=CLOSE, has_hist=True), "connection_dead"),
    (Facts("tcp", EPIPE), "unknown"),                 # nothing observed: never a guess
    (Facts("unix", EPIPE, peer_gone=False), "peer_closed"),
    (Facts("unix", EPIPE, shut_how=2, has_hist=True), "own_shutdown"),
    (Facts("tcp", EPIPE, shut_how=4, has_hist=True), "own_shutdown"),     # inferred from our FIN
    (Facts("unix", EPIPE, shut_how=5), "own_shutdown"),    # send side shut, peer open
    (Facts("pipe", EPIPE, peer_gone=True), "no_readers"),
    (Facts("fifo", EPIPE, peer_gone=True), "no_readers"),
    (Facts("other", EPIPE), "unknown"),
])
def test_classify(facts, cause):
    assert classify(facts) == cause


@pytest.mark.parametrize("kw,fate", [
    (dict(err=ECONNRESET), "not_raised"),
    (dict(nosignal=True), "suppressed"),
    (dict(sig_result=NOSIG), "not_raised"),       # the hook is there: none was raised
    (dict(sig_result=1, sig_disp=1), "ignored"),
    (dict(sig_result=0, sig_blocked=True, sig_disp=0), "blocked"),
    (dict(sig_result=0, sig_disp=2), "caught"),
    (dict(sig_result=0, sig_disp=0), "fatal"),
    (dict(sig_result=2), "pending"),
])
def test_sigpipe_fate(kw, fate):
    base = dict(kind="tcp", err=EPIPE)
    base.update(kw)
    assert sigpipe_fate(Facts(**base)) == fate


def test_sigpipe_fate_without_the_signal_hook_says_unknown():
    assert sigpipe_fate(Facts("tcp", EPIPE), sig_observed=False) == "not_seen"
    assert sigpipe_fate(Facts("tcp", EPIPE, nosignal=True), sig_observed=False) == "suppressed"


def _slow_accept_event() -> FailEvent:
    ms = 1_000_000
    h = SocketHistory(first_ts=1000 * ms, est_ts=1000 * ms, close_wait_ts=1050 * ms,
                      accept_ts=1450 * ms, accept_pid=42, rst_ts=1460 * ms, rst_state=CLOSE_WAIT,
                      err_ts=1460 * ms, err_reported=32,
                      states=[StateChange(1000 * ms, 3, 1), StateChange(1050 * ms, 1, 8),
                              StateChange(1460 * ms, 8, 7)])
    f = Facts("tcp", EPIPE, rst_state=CLOSE_WAIT, accepted_after_close=True, state_now=CLOSE,
              err_reported=32, has_hist=True, sig_result=1, sig_disp=1)
    return FailEvent(ts=1560 * ms, pid=42, tid=42, comm=b"server", ret=EPIPE, fd=4,
                     syscall="sendto", flags=0, facts=f,
                     endpoint=Endpoint(2, "127.0.0.1", 8080, "127.0.0.1", 50000), history=h)


def test_explain_slow_accept_sentence_and_queue_wait():
    v = explain(_slow_accept_event())
    assert v.cause == "accepted_after_peer_closed" and v.fate == "ignored"
    assert v.queue_wait_ns == 450_000_000
    assert "sat 450.0 ms in the accept queue" in v.sentence
    assert "closed it 400.0 ms before accept()" in v.sentence
    assert "RST in CLOSE_WAIT" in v.sentence and "sk_err=EPIPE" in v.sentence


def test_explain_slow_accept_without_the_accept_hook_gives_a_lower_bound():
    import dataclasses
    ev = _slow_accept_event()
    ev.history = dataclasses.replace(ev.history, accept_ts=0, accept_pid=0, passive=True,
                                     unaccepted_at_fin=True)
    v = explain(ev)
    assert v.cause == "accepted_after_peer_closed" and v.queue_wait_ns is None
    # FIN at +50 ms while unaccepted; the RST to our write at +460 ms
    assert v.details == {"accept_queue_wait_min_ms": 50.0, "accept_queue_wait_max_ms": 460.0}
    assert "closed the connection 50.0 ms after the handshake" in v.sentence
    assert "between 50.0 ms and 460.0 ms" in v.sentence and "sat" not in v.sentence
    ev.history = dataclasses.replace(ev.history, rst_ts=0, rst_state=0)
    v = explain(ev)
    assert v.details == {"accept_queue_wait_min_ms": 50.0} and "at least 50.0 ms" in v.sentence


def test_explain_inferred_shutdowns_say_how_they_were_seen():
    ms = 1_000_000
    h = SocketHistory(est_ts=1 * ms, shut_ts=10 * ms, shut_how=4, shut_pid=77)
    ev = FailEvent(ts=30 * ms, pid=77, tid=77, comm=b"app", ret=EPIPE, fd=3, syscall="write",
                   flags=0, facts=Facts("tcp", EPIPE, shut_how=4, has_hist=True, sig_result=1),
                   history=h)
    v = explain(ev)
    assert v.cause == "own_shutdown"
    assert "pid 77 sent our FIN with shutdown(SHUT_WR or SHUT_RDWR) 20.0 ms before" in v.sentence
    ev = FailEvent(ts=30 * ms, pid=77, tid=77, comm=b"app", ret=EPIPE, fd=3, syscall="write",
                   flags=0, facts=Facts("unix", EPIPE, shut_how=5, sig_result=1), peer_pid=78)
    v = explain(ev)
    assert v.cause == "own_shutdown" and "peer pid 78 still had its end open" in v.sentence
    assert "or the peer's SHUT_RD" in v.sentence


def test_explain_unknown_says_so():
    ev = FailEvent(ts=1, pid=1, tid=1, comm=b"x", ret=EPIPE, fd=3, syscall="write", flags=0,
                   facts=Facts("tcp", EPIPE, sig_result=1))
    v = explain(ev)
    assert v.cause == "unknown" and "no RST, shutdown or error was observed" in v.sentence
