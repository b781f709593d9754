"""Unit tests: untrusted strings, JSON fields, the summary from counter facts."""
from __future__ import annotations

import json

from tracer.events import Endpoint, Facts, RawCountKey, RawEvent, decode_count_key
from tracer.render import escape, json_string, summarize


def test_escape_terminal_sequences_and_invalid_utf8():
    assert escape(b"evil\x1b[31mred") == "evil\\x1b[31mred"
    assert escape(b"bad\xff\xfe") == "bad\\xff\\xfe"
    assert escape(b"ok\0garbage") == "ok"
    assert escape("tab\there") == "tab\\x09here"


def test_json_string_keeps_exact_bytes_when_lossy():
    assert json_string(b"nginx") == {"text": "nginx", "hex": None}
    d = json_string(b"a\xffb")
    assert d["hex"] == "61ff62"
    json.dumps(d)                                  # always encodable
    assert json_string(b"\x1b[2J") == {"text": "\x1b[2J", "hex": None}   # JSON escapes it


def test_summary_from_counter_facts_is_exact():
    ep = Endpoint(2, "", 0, "10.0.0.1", 443)
    counts = [
        (Facts("tcp", -32, rst_state=8, has_hist=True, sig_result=1), ep, 7),
        (Facts("tcp", -32, shut_how=2, has_hist=True, nosignal=True), ep, 3),
        (Facts("pipe", -32, peer_gone=True, sig_result=0, sig_disp=0), Endpoint(), 2),
    ]
    s = summarize(counts, [12, 5, 0, 12, 1, 0, 0, 0])
    assert s.total == 12 and s.lost == 5 and s.killed == 1
    assert s.by_cause == {"peer_reset_after_close": 7, "own_shutdown": 3, "no_readers": 2}
    assert s.by_fate == {"ignored": 7, "suppressed": 3, "fatal": 2}
    assert s.by_remote["10.0.0.1:443"] == 10 and s.by_remote["pipe"] == 2
    accepted = summarize([(Facts("tcp", -32, has_hist=True), Endpoint(2, "", 0, "10.0.0.9", 0), 4)],
                         [4, 0, 0, 4, 0, 0, 0, 0])
    assert accepted.by_remote == {"10.0.0.9 (clients)": 4}


def test_summary_takes_causes_from_the_exact_table_and_remotes_from_the_other():
    exact = [(Facts("tcp", -32, shut_how=2, has_hist=True), Endpoint(2), 10)]
    remote = [(Facts("tcp", -32, shut_how=2, has_hist=True), Endpoint(2, "", 0, "10.0.0.1", 80), 4),
              (Facts("tcp", -32, shut_how=2, has_hist=True), Endpoint(2, "", 0, "10.0.0.2", 80), 3)]
    s = summarize(exact, [10, 0, 0, 10, 0, 0, 3, 0], remote_counts=remote)
    assert s.total == 10 and s.by_cause == {"own_shutdown": 10}
    assert s.by_remote == {"10.0.0.1:80": 4, "10.0.0.2:80": 3,
                           "(other endpoints: table full)": 3}
    assert s.to_dict()["remote_uncounted"] == 3
    full = summarize(exact, [10, 0, 0, 10, 0, 0, 0, 0], remote_counts=remote + [
        (Facts("tcp", -32, shut_how=2, has_hist=True), Endpoint(2, "", 0, "10.0.0.3", 80), 3)])
    assert "(other endpoints: table full)" not in full.by_remote


def test_count_key_roundtrip():
    k = RawCountKey(kind=1, rst_state=8, family=2, rport=443, err=-32, sig_result=1)
    k.raddr[:4] = [10, 0, 0, 1]
    facts, ep = decode_count_key(bytes(k))
    assert facts.rst_state == 8 and facts.err == -32 and ep.remote() == "10.0.0.1:443"


def test_layout_sizes_match_the_c_structs():
    # keep in step with bpf/epipe.bpf.c; the BPF test checks them against bcc too
    import ctypes
    assert ctypes.sizeof(RawCountKey) == 40
    assert ctypes.sizeof(RawEvent) % 8 == 0


def test_a_failure_outside_a_send_syscall_names_no_syscall():
    from tracer.events import decode
    raw = RawEvent(type=1, kind=1, ret=-32, syscall_nr=0xFFFFFFFF, fd=-1, sig_result=0xFF)
    assert decode(bytes(raw), syscalls={1: "write"}).syscall == "-"     # io_uring, kthread
    raw.syscall_nr = 1
    assert decode(bytes(raw), syscalls={1: "write"}).syscall == "write"
