"""The tracer loads compiled bytecode and never maps the compiler itself."""
from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pytest

from tracer import capabilities, compiler, headers, loader, plan, program

pytestmark = pytest.mark.bpf

COMPILER_LIBS = ("libLLVM", "libclang", "libbcc.so")


def _mapped_compiler_libs(pid: int) -> set[str]:
    libs = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and any(x in parts[5] for x in COMPILER_LIBS):
            libs.add(parts[5])
    return libs


def _children(pid: int) -> list[str]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += (task / "children").read_text().split()
    return out


def test_tracing_process_never_maps_the_compiler(tracer, tmp_path):
    """Cold (fresh cache): the compile runs in a helper that is gone once the
    tool traces; warm: nothing is compiled. Neither run maps LLVM."""
    env = {"EPIPE_TRACE_CACHE": str(tmp_path)}
    for expect in ("now", "cached"):
        t = tracer("-d", "30", env=env)
        assert _mapped_compiler_libs(t.proc.pid) == set()
        assert _children(t.proc.pid) == []          # the helper has exited
        rc, objs, err = t.stop_json()
        assert rc == 0, err
        prog = objs[-1]["program"]
        assert prog["compiled"] == expect, prog
        if expect == "now":
            # the helper's own high-water mark, as it measured it
            assert prog["compile_helper_peak_kb"] > 0
        else:
            assert prog["compile_helper_peak_kb"] == 0
    assert len(list((tmp_path / "programs").glob("*.json"))) == 1


def test_a_cached_program_the_kernel_refuses_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setattr(headers, "DEFAULT_CACHE", tmp_path)   # real-header kernels
    caps = capabilities.detect(try_fentry=False)
    tree = headers.prepare(caps, cache_dir=tmp_path, roots_text=program.source_text())
    p, f = plan.make_plan(caps), program.Filters()
    first = loader.load(tree, p, f)
    first.detach()
    assert not first.compiled.cached
    path = compiler.cache_dir(tree) / f"{first.compiled.key}.json"
    d = json.loads(path.read_text())
    exit_only = struct.pack("<BBhi", 0x95, 0, 0, 0)      # r0 never set: the verifier refuses
    for fn in d["funcs"]:
        fn["insns"], fn["relocs"] = base64.b64encode(exit_only).decode(), []
    path.write_text(json.dumps(d))
    again = loader.load(tree, p, f)
    try:
        assert not again.compiled.cached and again.attachments
    finally:
        again.detach()
    third = loader.load(tree, p, f)             # the cache holds the good one again
    third.detach()
    assert third.compiled.cached and third.compiled.key == first.compiled.key


def _helpers() -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"tracer.compiler" in (p / "cmdline").read_bytes():
                    out.add(int(p.name))
            except OSError:
                pass
    return out


def test_the_compile_helper_dies_with_a_killed_tracer(tmp_path):
    """kill -9 of the tracer mid-compile must not leave a compiler running."""
    import signal
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parent.parent
    before = _helpers()
    tool = subprocess.Popen([sys.executable, "-m", "tracer", "-d", "30"], cwd=root,
                            env=dict(os.environ, EPIPE_TRACE_CACHE=str(tmp_path)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (_helpers() - before):
        assert tool.poll() is None and time.monotonic() < deadline, "no compile helper seen"
        time.sleep(0.005)
    helper = (_helpers() - before).pop()
    # once it maps libbcc it is past main()'s prctl; stopped, it could not
    # finish and exit on its own: only the parent-death signal can end it
    while "libbcc.so" not in Path(f"/proc/{helper}/maps").read_text():
        assert time.monotonic() < deadline, "the helper never loaded bcc"
        time.sleep(0.005)
    os.kill(helper, signal.SIGSTOP)
    tool.send_signal(signal.SIGKILL)
    tool.wait()
    try:
        while helper in _helpers():
            assert time.monotonic() < deadline, f"helper {helper} outlived the tracer"
            time.sleep(0.01)
    finally:
        if helper in _helpers():
            os.kill(helper, signal.SIGKILL)


def test_stack_symbols_come_without_the_compiler():
    """--stack names frames with bcc's symbol caches from libbcc_bpf, as
    bcc's BPF.sym/ksym would, in a process that maps no LLVM."""
    import subprocess
    import sys
    code = """
import ctypes, json, os
from tracer import bpfsys
libc = ctypes.CDLL("libc.so.6")
addr = ctypes.cast(libc.getpid, ctypes.c_void_p).value
k = next(int(l.split()[0], 16) for l in open("/proc/kallsyms")
         if l.split()[2] == "tcp_sendmsg" and l.split()[1] in "tT")
sym = bpfsys.Symbols()
maps = open("/proc/self/maps").read()
print(json.dumps({"user": sym.resolve(addr + 4, os.getpid(), show_module=True),
                  "kernel": sym.resolve(k + 8),
                  "llvm": any(x in maps for x in ("libLLVM", "libclang", "libbcc.so"))}))
"""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["user"] in ("getpid+0x4 [libc.so.6]", "__getpid+0x4 [libc.so.6]"), d
    assert d["kernel"] == "tcp_sendmsg+0x8", d
    assert d["llvm"] is False
