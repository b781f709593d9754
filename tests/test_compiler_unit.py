"""Unit tests for turning bcc's bytecode into cacheable, relocatable form."""
from __future__ import annotations

import json
import os
import struct

import pytest

from tracer import compiler
from tracer.compiler import Compiled, CompileError, FuncSpec, MapSpec, relocations
from tracer.headers import HeaderTree


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


MOV_R0_0 = insn(0xB7)                     # r0 = 0
EXIT = insn(0x95)


def ld_map(fd: int, src: int = 1, dst: int = 1) -> bytes:
    return insn(0x18, dst, src, 0, fd) + insn(0, 0, 0, 0, 0)


def test_map_loads_become_indexes_and_nothing_else_changes():
    # fd 7 -> map 0, fd 9 -> map 1; a plain 64-bit constant (src 0) is left alone
    prog = ld_map(9) + insn(0x18, 2, 0, 0, 9) + insn(0) + ld_map(7, src=2) + MOV_R0_0 + EXIT
    out, relocs = relocations(prog, {7: 0, 9: 1})
    assert relocs == [(0, 1), (4, 0)]
    assert out[0:4] == prog[0:4] and out[4:8] == bytes(4)           # imm zeroed
    assert out[16:32] == prog[16:32]                               # the constant kept its 9
    assert out[32:36] == prog[32:36] and out[36:40] == bytes(4)
    assert out[48:] == prog[48:]


def test_second_half_of_a_wide_load_is_never_read_as_an_instruction():
    # the second slot's byte pattern looks like a map load; it must be skipped
    tricky = insn(0x18, 1, 1, 0, 5) + insn(0x18, 0, 1, 0, 123)
    _out, relocs = relocations(tricky + EXIT, {5: 0})
    assert relocs == [(0, 0)]


def test_a_map_fd_that_is_no_map_of_the_program_is_refused():
    with pytest.raises(CompileError, match="fd 42"):
        relocations(ld_map(42) + EXIT, {7: 0})


def _compiled() -> Compiled:
    prog = ld_map(7) + ld_map(8) + MOV_R0_0 + EXIT
    insns, relocs = relocations(prog, {7: 0, 8: 1})
    return Compiled(maps=[MapSpec("events", 27, 0, 0, 1 << 20, 0),
                          MapSpec("counts", 1, 16, 8, 4096, 0)],
                    funcs=[FuncSpec("raw_tracepoint__sock_send_length", insns, relocs)],
                    license="GPL", kern_version=396800, full_vmlinux=True,
                    compile_seconds=0.5, helper_peak_kb=123456)


def test_json_round_trip_and_relocation_into_this_process_fds():
    c = Compiled.from_json(json.loads(json.dumps(_compiled().to_json())))
    f = c.func("raw_tracepoint__sock_send_length")
    assert c.license == "GPL" and c.kern_version == 396800 and c.full_vmlinux
    assert [m.name for m in c.maps] == ["events", "counts"]
    code = c.relocated(f, [31, 32])
    assert struct.unpack_from("<i", code, 4)[0] == 31
    assert struct.unpack_from("<i", code, 20)[0] == 32
    assert code[32:] == MOV_R0_0 + EXIT


def test_another_generation_is_not_read():
    d = _compiled().to_json()
    d["generation"] = "0"
    with pytest.raises(ValueError):
        Compiled.from_json(d)


def _tree(tmp_path) -> HeaderTree:
    path = tmp_path / "headers" / "k1"
    path.mkdir(parents=True)
    return HeaderTree(str(path), "btf-generated", cached=True, seconds=0.0, key="k1")


def test_cache_key_follows_text_and_tree(tmp_path):
    t = _tree(tmp_path)
    other = HeaderTree(t.path, t.kind, True, 0.0, key="k2")
    assert compiler.cache_key(t, "a") == compiler.cache_key(t, "a")
    assert compiler.cache_key(t, "a") != compiler.cache_key(t, "b")
    assert compiler.cache_key(t, "a") != compiler.cache_key(other, "a")


def test_cache_round_trip_marks_it_cached(tmp_path):
    t = _tree(tmp_path)
    c = _compiled()
    c.key = compiler.cache_key(t, "text")
    compiler.write_cache(t, c)
    back = compiler.read_cache(t, compiler.cache_key(t, "text"))
    assert back is not None and back.cached
    assert back.helper_peak_kb == 0 and back.compile_seconds == 0     # nothing compiled now
    assert back.func("raw_tracepoint__sock_send_length").insns == c.funcs[0].insns
    assert compiler.read_cache(t, compiler.cache_key(t, "other text")) is None


def test_torn_or_writable_cache_files_are_not_used(tmp_path):
    t = _tree(tmp_path)
    c = _compiled()
    c.key = compiler.cache_key(t, "text")
    compiler.write_cache(t, c)
    path = compiler.cache_dir(t) / f"{c.key}.json"
    os.chmod(path, 0o666)                  # anyone could have put bytecode there
    assert compiler.read_cache(t, compiler.cache_key(t, "text")) is None
    os.chmod(path, 0o644)
    assert compiler.read_cache(t, compiler.cache_key(t, "text")) is not None
    path.write_text(path.read_text()[:100])
    assert compiler.read_cache(t, compiler.cache_key(t, "text")) is None


def test_cache_keeps_only_the_newest_programs(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "KEEP_PROGRAMS", 3)
    t = _tree(tmp_path)
    for i in range(5):
        c = _compiled()
        c.key = compiler.cache_key(t, f"text {i}")
        compiler.write_cache(t, c)
        os.utime(compiler.cache_dir(t) / f"{c.key}.json", (1000 + i, 1000 + i))
    left = sorted(p.name for p in compiler.cache_dir(t).glob("*.json"))
    assert len(left) == 3
    assert compiler.read_cache(t, compiler.cache_key(t, "text 4")) is not None
    assert compiler.read_cache(t, compiler.cache_key(t, "text 0")) is None


def test_attach_points_follow_bccs_names_and_the_plan():
    from tracer.capabilities import KernelCapabilities
    from tracer.loader import attach_points
    from tracer.plan import make_plan
    caps = KernelCapabilities(
        release="t", machine="x86_64", btf=True, btf_path="/x", headers_dir=None,
        kprobes=True, kprobes_reason="", fentry=False, fentry_reason="",
        raw_tracepoints=True, ringbuf=True, tracefs="/t",
        functions={"anon_pipe_write": ["struct kiocb *"], "fifo_pipe_write": ["struct kiocb *"]})
    plan = make_plan(caps)
    assert attach_points(plan, "kprobe__tcp_reset") == [("kprobe", "tcp_reset")]
    assert attach_points(plan, "kretprobe__sk_stream_error") == [("kretprobe", "sk_stream_error")]
    assert attach_points(plan, "tracepoint__signal__signal_deliver") == \
        [("tracepoint", "signal:signal_deliver")]
    assert attach_points(plan, "raw_tracepoint__sys_exit") == [("raw_tracepoint", "sys_exit")]
    assert attach_points(plan, "ep_pipe_write") == [("kprobe", "anon_pipe_write"),
                                                    ("kprobe", "fifo_pipe_write")]
    assert attach_points(plan, "ep_some_helper") == []      # not a probe: not loaded
