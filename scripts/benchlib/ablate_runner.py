"""epipe-trace with some hooks left out, for scripts/bench --ablate.

    python scripts/benchlib/ablate_runner.py REPO [--disable h1,h2] [-p PID] [--type T]

Does what `python -m tracer --json [-p PID] [--type T]` does, through the
tracer's own Session, but builds the probe plan with
``make_plan(caps, disable=...)`` (hook names as in tracer/plan.py HOOKS, e.g.
stream_error, send_failure, state_change, close, accept), so the cost of one
hook can be measured as the difference to the full tool. Prints the same ready
line on stderr. Measurement only: the program may be "degraded" on purpose.
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("--disable", default="")
    ap.add_argument("-p", "--pid", type=int)
    ap.add_argument("--type", dest="types", default="")
    a = ap.parse_args()
    sys.path.insert(0, a.repo)
    os.chdir(a.repo)
    from tracer.plan import HOOKS, make_plan
    from tracer.program import Filters
    from tracer.session import Session, SessionOptions, prepare

    known = {h.name for h in HOOKS}
    disable = frozenset(x for x in a.disable.split(",") if x)
    bad = disable - known
    if bad:
        print(f"ablate_runner: unknown hook(s) {sorted(bad)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    kinds = None
    if a.types:
        kinds = set()
        for t in a.types.split(","):
            kinds |= {"pipe", "fifo"} if t == "pipe" else {t}
    filters = Filters(pids=[a.pid] if a.pid else [], kinds=kinds)
    opts = SessionOptions(filters=filters, json=True)
    caps, tree, _plan = prepare(opts)
    plan = make_plan(caps, disable=disable)
    sess = Session(opts)

    def ready(_s):
        print(f"epipe-trace: tracing broken pipes (ablation: without {','.join(sorted(disable)) or '-'})",
              file=sys.stderr, flush=True)

    return sess.run(plan, tree, ready_cb=ready)


if __name__ == "__main__":
    sys.exit(main())
