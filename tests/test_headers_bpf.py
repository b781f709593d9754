"""The BTF-generated header tree lets bcc read real kernel structs correctly."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
import socket

import pytest

from tracer import capabilities, headers

pytestmark = pytest.mark.bpf

PROG = r"""
#include <net/sock.h>
#include <linux/tcp.h>
struct val { u8 state; u8 shutdown; u16 lport; s32 err; u32 sndbuf; };
BPF_HASH(seen, u64, struct val);
TRACEPOINT_PROBE(syscalls, sys_enter_getsockopt) {
    /* the test calls getsockopt(fd) on its own sockets: fd -> file -> sock;
     * every offset comes from the generated tree */
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    struct files_struct *files = 0;
    struct fdtable *fdt = 0;
    struct file **fda = 0;
    struct file *f = 0;
    struct socket *so = 0;
    struct sock *sk = 0;
    bpf_probe_read_kernel(&files, sizeof(files), &t->files);
    bpf_probe_read_kernel(&fdt, sizeof(fdt), &files->fdt);
    bpf_probe_read_kernel(&fda, sizeof(fda), &fdt->fd);
    bpf_probe_read_kernel(&f, sizeof(f), &fda[args->fd & 0xff]);
    bpf_probe_read_kernel(&so, sizeof(so), &f->private_data);
    bpf_probe_read_kernel(&sk, sizeof(sk), &so->sk);
    struct val v = {};
    bpf_probe_read_kernel(&v.state, 1, &sk->__sk_common.skc_state);
    bpf_probe_read_kernel(&v.shutdown, 1, &sk->sk_shutdown);
    bpf_probe_read_kernel(&v.lport, 2, &sk->__sk_common.skc_num);
    bpf_probe_read_kernel(&v.err, 4, &sk->sk_err);
    bpf_probe_read_kernel(&v.sndbuf, 4, &sk->sk_sndbuf);
    u64 key = ((u64)bpf_get_current_pid_tgid() << 32) | args->fd;
    seen.update(&key, &v);
    return 0;
}
"""


def test_generated_tree_reads_struct_sock_like_the_kernel(tmp_path):
    caps = capabilities.detect(try_fentry=False)
    if not caps.btf:
        pytest.skip("kernel has no BTF")
    tree = headers.prepare(caps, cache_dir=tmp_path, prefer="btf")
    assert tree.kind == "btf-generated" and not tree.cached
    again = headers.prepare(caps, cache_dir=tmp_path, prefer="btf")
    assert again.cached and again.path == tree.path
    os.environ["BCC_KERNEL_SOURCE"] = tree.path
    from bcc import BPF
    b = BPF(text=PROG, cflags=["-Wno-everything"])
    try:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        cli = socket.create_connection(srv.getsockname())
        acc, _ = srv.accept()
        cli.shutdown(socket.SHUT_WR)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        expect = {
            srv.fileno(): (10, 0, srv.getsockname()[1]),           # LISTEN
            cli.fileno(): (4, 2, cli.getsockname()[1]),             # FIN_WAIT1/2, SEND_SHUTDOWN
            acc.fileno(): (8, 1, srv.getsockname()[1]),             # CLOSE_WAIT, RCV_SHUTDOWN
        }
        import time
        time.sleep(0.05)
        for s in (srv, cli, acc):
            s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        pid = os.getpid()
        got = {k.value & 0xFFFFFFFF: v for k, v in b["seen"].items() if k.value >> 32 == pid}
        for fd, (state, shut, port) in expect.items():
            v = got[fd]
            assert v.lport == port
            assert v.shutdown == shut
            if fd == cli.fileno():
                assert v.state in (4, 5)                            # FIN_WAIT1 or FIN_WAIT2
                assert v.sndbuf == cli.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            else:
                assert v.state == state
            assert v.err == 0
        for s in (srv, cli, acc):
            s.close()
    finally:
        b.cleanup()


def test_python_layouts_match_what_bcc_compiled(tmp_path):
    """events.py's ctypes mirrors must have the C structs' sizes."""
    from tracer import loader, plan, program
    from tracer.events import RawCountKey, RawEvent
    caps = capabilities.detect(try_fentry=False)
    tree = headers.prepare(caps)
    loaded = loader.load(tree, plan.make_plan(caps), program.Filters())
    try:
        # the sizes the kernel created the maps with
        assert loaded.maps["counts"].key_size == ctypes.sizeof(RawCountKey)
        assert loaded.maps["zero_event"].value_size == ctypes.sizeof(RawEvent)
    finally:
        loaded.detach()


@pytest.mark.bpf
def test_cut_header_compiles_every_plan_and_filter_without_falling_back(tmp_path):
    """The generated vmlinux.h is cut to what bpf/epipe.bpf.c reaches; every
    #if branch the plans and filters select must still find its types."""
    from tracer import loader, plan, program
    caps = capabilities.detect(try_fentry=False)
    if not caps.btf:
        pytest.skip("kernel has no BTF")
    tree = headers.prepare(caps, cache_dir=tmp_path, prefer="btf",
                           roots_text=program.source_text())
    text = (Path(tree.path) / "include/epipe/vmlinux.h").read_text()
    full = (Path(tree.path) / "include/epipe/vmlinux-full.h").read_text()
    assert len(text) * 5 < len(full)                 # really cut
    variants = [
        (plan.make_plan(caps), program.Filters(), program.ProgramOptions(stacks=True)),
        (plan.make_plan(caps, syscalls=True),
         program.Filters(pids=[os.getpid()], comm="x", lports=[1], dports=[2], family=2,
                         cgroup_id=1, kinds={"tcp", "pipe"}), program.ProgramOptions()),
        (plan.make_plan(caps, prefer="tracepoint"), program.Filters(kinds={"unix"}),
         program.ProgramOptions()),
    ]
    for p, f, o in variants:
        loaded = loader.load(tree, p, f, o)
        try:
            assert not loaded.full_vmlinux, [c.target for c in p.choices]
        finally:
            loaded.detach()
