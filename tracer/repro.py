"""`repro` and `compare`: a kernel fingerprint, and the diff of several.

``repro`` runs the fixed scenario catalog (tracer/scenarios.py) on loopback
with one tracer attached (one compile: bcc compiles are what cost inside slow
guests) and records, per scenario, facts that do not depend on timing: what
each send returned, the verdicts, the states the socket went through, which
kernel path saw the error. ``compare`` puts fingerprints side by side.
"""
from __future__ import annotations

import io
import json
import platform
import threading
import time
from pathlib import Path

from tabulate import tabulate

from . import __version__, scenarios
from .session import Session, SessionOptions, Stop, prepare
from .program import Filters


def _facts_for(outcome: scenarios.Outcome, events: list[dict]) -> dict:
    mine = [e for e in events if e.get("pid") == outcome.pid]
    fails = [e for e in mine if e["event"] == "broken_pipe"]
    first = fails[0] if fails else {}
    hist = first.get("history") or {}
    return {
        "sends": outcome.sends,
        "exit_signal": outcome.killed_by,
        "errors": [f["error"] for f in fails],
        "causes": sorted({f["cause"] for f in fails}),
        "sigpipe": [f["sigpipe"] for f in fails],
        "kernel_path": first.get("kernel_path"),
        "kind": first.get("kind"),
        "rst_state": (hist.get("rst") or {}).get("state"),
        "states": [f"{s['from']}>{s['to']}" for s in hist.get("states", [])],
        "error_reported": hist.get("error_reported"),
        "killed_event": any(e["event"] == "killed_by_sigpipe" for e in mine),
        "handler_delivered": any(e["event"] == "sigpipe_delivered" for e in mine),
    }


def run_repro(prefer: str | None = None, syscalls: bool = False) -> dict:
    opts = SessionOptions(filters=Filters(), json=True, prefer=prefer, syscalls=syscalls,
                          quiet_summary=True)
    caps, tree, plan = prepare(opts)
    out = io.StringIO()
    sess = Session(opts, out=out)
    results: dict = {}
    worker_error: list[BaseException] = []

    def work(_sess):
        def body():
            try:
                for sc in scenarios.CATALOG.values():
                    proc = scenarios.start(sc)
                    results[sc.name] = scenarios.finish(sc, proc)
                    time.sleep(0.2)
            except BaseException as e:  # noqa: BLE001
                worker_error.append(e)
            finally:
                time.sleep(0.5)
                sess.request_stop("scenarios done")
        threading.Thread(target=body, daemon=True).start()

    t0 = time.monotonic()
    sess.run(plan, tree, ready_cb=work)
    if worker_error:
        raise worker_error[0]
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    per = {}
    for name, outcome in results.items():
        sc = scenarios.CATALOG[name]
        facts = _facts_for(outcome, events)
        facts["expected"] = {"cause": sc.expect_cause, "sigpipe": sc.expect_fate}
        fates = sc.expect_fate if isinstance(sc.expect_fate, tuple) else (sc.expect_fate,)
        facts["as_expected"] = (sc.expect_cause in facts["causes"]
                                and any(f in facts["sigpipe"] for f in fates))
        per[name] = facts
    return {
        "fingerprint_version": scenarios.SCENARIO_VERSION,
        "tool_version": __version__,
        "kernel": {"release": caps.release, "machine": caps.machine,
                   "config": caps.config, "kprobes": caps.kprobes, "fentry": caps.fentry,
                   "btf": caps.btf, "headers": tree.kind},
        "bcc_version": _bcc_version(),
        "python": platform.python_version(),
        "plan": {c.hook.name: f"{c.mechanism} {c.target}".strip() for c in plan.choices},
        "seconds": round(time.monotonic() - t0, 1),
        "scenarios": per,
    }


def _bcc_version() -> str:
    """bcc's version from its version.py: importing bcc would map LLVM."""
    import importlib.util
    import re
    try:
        spec = importlib.util.find_spec("bcc")
        for d in (spec.submodule_search_locations or []) if spec else []:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (Path(d) / "version.py").read_text())
            if m:
                return m.group(1)
    except (ImportError, OSError, ValueError):
        pass
    return "unknown"


# --- compare -----------------------------------------------------------------

def _flatten(doc: dict) -> dict[tuple[str, str], str]:
    rows: dict[tuple[str, str], str] = {}
    for name, facts in doc.get("scenarios", {}).items():
        for k, v in facts.items():
            if k == "expected":
                continue
            rows[(name, k)] = json.dumps(v, separators=(",", ":"))
    for hook, mech in doc.get("plan", {}).items():
        rows[("plan", hook)] = mech
    return rows


def compare(docs: list[dict], names: list[str]) -> tuple[list[dict], bool]:
    flats = [_flatten(d) for d in docs]
    keys = sorted(set().union(*flats), key=lambda k: (k[0] == "plan", k))
    rows, differ = [], False
    for key in keys:
        vals = [f.get(key, "(absent)") for f in flats]
        same = len(set(vals)) == 1
        # the plan is expected to differ between kernels: shown, not a difference
        if not same and key[0] != "plan":
            differ = True
        rows.append({"scenario": key[0], "fact": key[1], "values": dict(zip(names, vals)),
                     "differs": not same})
    return rows, differ


def compare_table(rows: list[dict], names: list[str], only_diff: bool = False) -> str:
    table = []
    for r in rows:
        if only_diff and not r["differs"]:
            continue
        mark = "*" if r["differs"] else ""
        table.append([mark, r["scenario"], r["fact"], *(r["values"][n] for n in names)])
    return tabulate(table, headers=["", "SCENARIO", "FACT", *names], tablefmt="simple",
                    maxcolwidths=[1, 20, 18, *([40] * len(names))])
