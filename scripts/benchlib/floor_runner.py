"""The floor under the send-path cost: an empty program on the tracepoint
epipe-trace reports socket failures at, for scripts/bench's "floor" column.

    python scripts/benchlib/floor_runner.py REPO

Compiles ``RAW_TRACEPOINT_PROBE(sock_send_length) { return 0; }`` with the
tracer's own compile helper, attaches it with the tracer's own loader code
(bpfsys), prints the tracer's ready line on stderr and waits for SIGINT. What
a workload loses under it is what the hook costs before any of our code runs:
the tracepoint's dispatch into BPF. No summary is printed.
"""
from __future__ import annotations

import os
import signal
import sys

TEXT = "RAW_TRACEPOINT_PROBE(sock_send_length)\n{\n    return 0;\n}\n"


def main() -> int:
    repo = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    sys.path.insert(0, repo)
    os.chdir(repo)
    from tracer import bpfsys, capabilities, headers
    from tracer.compiler import compile_program
    caps = capabilities.detect(try_fentry=False)
    if "sock:sock_send_length" not in caps.tracepoints:
        print("floor_runner: this kernel has no sock:sock_send_length", file=sys.stderr)
        return 2
    tree = headers.prepare(caps, roots_text=TEXT)
    c = compile_program(tree, TEXT)
    f = c.func("raw_tracepoint__sock_send_length")
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    fd = bpfsys.load_program(bpfsys.PROG_RAW_TRACEPOINT, f.name, f.insns, c.license, c.kern_version)
    att = bpfsys.attach_raw_tracepoint(fd, "sock_send_length")
    try:
        print("epipe-trace: tracing broken pipes (floor: an empty program on "
              "sock:sock_send_length)", file=sys.stderr, flush=True)
        while not stop:
            signal.pause()
    finally:
        att.close()
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
