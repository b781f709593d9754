"""Compile the program text to BPF bytecode, in a helper process, and cache it.

Compiling means bcc, and bcc means LLVM and clang mapped into the process:
65 MB of RSS on import and another 50 MB at the peak of a compile, which
stays as the tracer's high-water mark for as long as it runs. So the
compile runs in a short-lived helper (``python -m tracer.compiler``) that
hands back, as JSON, what the kernel needs: each function's instructions with
its map references turned into map indexes, and each map's definition. The
tracer itself only creates maps and loads instructions (``bpfsys``).

The result is cached next to the header tree, keyed by everything that
changes the bytes (program text, header tree, kernel, bcc), so a trace with
options already used on this kernel starts without compiling at all.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .headers import FULL_VMLINUX_DEFINE, HeaderTree, libbcc_path

GENERATION = "1"           # bump when the cached format or its meaning changes
_LD_IMM64 = 0x18           # BPF_LD | BPF_IMM | BPF_DW: the two-slot load of a map
_PSEUDO_MAP = (1, 2)       # BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE


class CompileError(Exception):
    """bcc could not compile the program; str() carries clang's errors."""


@dataclass
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass
class FuncSpec:
    name: str
    insns: bytes
    relocs: list[tuple[int, int]]   # (instruction index, map index) of each map load


@dataclass
class Compiled:
    maps: list[MapSpec]
    funcs: list[FuncSpec]
    license: str
    kern_version: int
    full_vmlinux: bool = False      # the cut vmlinux.h failed and the complete one was used
    compile_seconds: float = 0.0    # 0 when it came from the cache
    helper_peak_kb: int = 0         # the helper's VmHWM (0 when cached)
    cached: bool = False
    key: str = ""

    def func(self, name: str) -> FuncSpec:
        for f in self.funcs:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_json(self) -> dict:
        return {
            "generation": GENERATION, "license": self.license, "kern_version": self.kern_version,
            "full_vmlinux": self.full_vmlinux,
            "maps": [vars(m) for m in self.maps],
            "funcs": [{"name": f.name, "insns": base64.b64encode(f.insns).decode(),
                       "relocs": f.relocs} for f in self.funcs],
            "compile_seconds": self.compile_seconds, "helper_peak_kb": self.helper_peak_kb,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Compiled":
        if d.get("generation") != GENERATION:
            raise ValueError("another generation")
        return cls(maps=[MapSpec(**m) for m in d["maps"]],
                   funcs=[FuncSpec(f["name"], base64.b64decode(f["insns"]),
                                   [tuple(r) for r in f["relocs"]]) for f in d["funcs"]],
                   license=d["license"], kern_version=int(d["kern_version"]),
                   full_vmlinux=bool(d.get("full_vmlinux")),
                   compile_seconds=float(d.get("compile_seconds", 0)),
                   helper_peak_kb=int(d.get("helper_peak_kb", 0)))

    def relocated(self, f: FuncSpec, map_fds: list[int]) -> bytes:
        """The function's instructions with this process's map fds put in."""
        b = bytearray(f.insns)
        for idx, m in f.relocs:
            b[idx * 8 + 4:idx * 8 + 8] = map_fds[m].to_bytes(4, sys.byteorder, signed=True)
        return bytes(b)


def relocations(insns: bytes, fd_to_index: dict[int, int]) -> tuple[bytes, list[tuple[int, int]]]:
    """Turn the map fds bcc put into the map loads into indexes (imm zeroed)."""
    b = bytearray(insns)
    relocs = []
    i = 0
    while i < len(b) // 8:
        code, regs = b[i * 8], b[i * 8 + 1]
        src = regs >> 4 if sys.byteorder == "little" else regs & 0xF
        if code == _LD_IMM64:
            if src in _PSEUDO_MAP:
                fd = int.from_bytes(b[i * 8 + 4:i * 8 + 8], sys.byteorder, signed=True)
                if fd not in fd_to_index:
                    raise CompileError(f"instruction {i} loads fd {fd}, which is no map of the program")
                relocs.append((i, fd_to_index[fd]))
                b[i * 8 + 4:i * 8 + 8] = bytes(4)
            i += 2
            continue
        i += 1
    return bytes(b), relocs


# --- the parent's side ---------------------------------------------------------

def _bcc_identity() -> str:
    lib = libbcc_path()
    if lib is None:
        return "no-libbcc"
    try:
        st = lib.stat()
    except OSError:
        return str(lib)
    return f"{lib}:{st.st_size}:{int(st.st_mtime)}"


def _tree_identity(tree: HeaderTree) -> str:
    """A generated tree is named by its own key; real headers by their
    configuration file, which a reinstalled headers package rewrites."""
    if tree.key:
        return tree.key
    try:
        st = (Path(tree.path) / "include/generated/autoconf.h").stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return ""


def cache_key(tree: HeaderTree, text: str) -> str:
    u = platform.uname()
    h = hashlib.sha256()
    for part in (GENERATION, u.release, u.version, u.machine, _bcc_identity(),
                 tree.kind, tree.path, _tree_identity(tree), text):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


KEEP_PROGRAMS = 32          # cached programs kept (newest first); each is ~100 KB


def cache_dir(tree: HeaderTree) -> Path:
    """Beside the generated header trees, or in the default cache for real headers."""
    if tree.kind == "btf-generated":
        return Path(tree.path).parent.parent / "programs"
    from .headers import DEFAULT_CACHE
    return DEFAULT_CACHE / "programs"


def _trusted(path: Path) -> bool:
    """Bytecode the tracer loads as root: only from a file root owns and
    nobody else may write, in a directory nobody else may write."""
    try:
        for p in (path.parent, path):
            st = p.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def read_cache(tree: HeaderTree, key: str) -> Compiled | None:
    path = cache_dir(tree) / f"{key}.json"
    if not path.exists() or not _trusted(path):
        return None
    try:
        c = Compiled.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None             # torn or foreign: compile again, overwrite
    # nothing was compiled by this run
    c.cached, c.key, c.compile_seconds, c.helper_peak_kb = True, key, 0.0, 0
    return c


def write_cache(tree: HeaderTree, c: Compiled) -> None:
    d = cache_dir(tree)
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = d / f".{c.key}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(c.to_json(), f)
        os.replace(tmp, d / f"{c.key}.json")   # readers see all of it or nothing
        old = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in old[:-KEEP_PROGRAMS]:
            p.unlink(missing_ok=True)
    except OSError:
        pass                    # a read-only cache only costs the next start a compile


def compile_program(tree: HeaderTree, text: str, reuse: bool = True) -> Compiled:
    """The compiled program: from the cache (unless ``reuse`` is False), else
    from a helper process, and then cached."""
    key = cache_key(tree, text)
    if reuse:
        c = read_cache(tree, key)
        if c is not None:
            return c
    c = run_helper(tree, text)
    c.key = key
    write_cache(tree, c)
    return c


def run_helper(tree: HeaderTree, text: str) -> Compiled:
    env = dict(os.environ)
    if tree.kind == "btf-generated":
        env["BCC_KERNEL_SOURCE"] = tree.path
    else:
        # real headers: let bcc find /lib/modules/<release>/{build,source}
        # itself; naming build alone hides the source half of Debian's split
        # headers (kconfig.h not found)
        env.pop("BCC_KERNEL_SOURCE", None)
    variants = [[]]
    if tree.kind == "btf-generated" and (Path(tree.path) / "include/epipe/vmlinux-full.h").exists():
        # the cut vmlinux.h reaches what this program uses; the complete one is
        # the fallback should the cut ever miss a type
        variants.append([FULL_VMLINUX_DEFINE])
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["EPIPE_TRACE_PARENT"] = str(os.getpid())
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "tracer.compiler"],
                           input=json.dumps({"text": text, "variants": variants}),
                           capture_output=True, text=True, env=env)
    except OSError as e:
        raise CompileError(f"could not start the compile helper: {e}") from e
    try:
        reply = json.loads(p.stdout) if p.stdout.strip() else {}
    except ValueError:
        reply = {}
    if p.returncode != 0 or "maps" not in reply:
        why = reply.get("error") or (f"the compile helper died (exit {p.returncode})"
                                     if p.returncode else "the compile helper said nothing")
        # clang's diagnostics: the lines that name an error
        detail = "\n".join([ln for ln in p.stderr.splitlines() if "error" in ln.lower()][:6])
        raise CompileError(why + (f":\n{detail}" if detail else ""))
    c = Compiled.from_json(reply)
    c.compile_seconds = time.monotonic() - t0
    return c


# --- the helper's side (runs with bcc imported) ---------------------------------

def _map_specs(bpf_mod, lib) -> tuple[list[MapSpec], dict[int, int]]:
    import ctypes as ct

    class MapInfo(ct.Structure):            # struct bpf_map_info, the part used
        _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                    ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                    ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                    ("rest", ct.c_uint8 * 64)]

    lib.bpf_num_tables.restype = ct.c_ulonglong
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_ulonglong]
    lib.bpf_table_fd_id.restype = ct.c_int
    lib.bpf_table_fd_id.argtypes = [ct.c_void_p, ct.c_ulonglong]
    lib.bpf_obj_get_info.restype = ct.c_int
    lib.bpf_obj_get_info.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    specs, fd_to_index = [], {}
    for i in range(lib.bpf_num_tables(bpf_mod)):
        name = lib.bpf_table_name(bpf_mod, i).decode()
        fd = lib.bpf_table_fd_id(bpf_mod, i)
        info = MapInfo()
        n = ct.c_uint32(ct.sizeof(info))
        if fd < 0 or lib.bpf_obj_get_info(fd, ct.byref(info), ct.byref(n)) != 0:
            raise CompileError(f"bcc made no map for table {name}")
        fd_to_index[fd] = len(specs)
        specs.append(MapSpec(name, info.type, info.key_size, info.value_size,
                             info.max_entries, info.map_flags))
    return specs, fd_to_index


def _compile(text: str, variants: list[list[str]]) -> dict:
    from bcc import BPF
    from bcc.libbcc import lib
    # compile only: no program is loaded or attached in the helper
    BPF._trace_autoload = lambda self: None
    err = None
    for extra in variants:
        try:
            b = BPF(text=text, cflags=["-Wno-everything", *extra])
        except Exception as e:      # bcc raises bare Exception for compile errors
            err = e
            continue
        maps, fd_to_index = _map_specs(b.module, lib)
        funcs = []
        for i in range(lib.bpf_num_functions(b.module)):
            name = lib.bpf_function_name(b.module, i).decode()
            insns, relocs = relocations(b.dump_func(name), fd_to_index)
            funcs.append(FuncSpec(name, insns, relocs))
        c = Compiled(maps, funcs, lib.bpf_module_license(b.module).decode(),
                     lib.bpf_module_kern_version(b.module), full_vmlinux=bool(extra))
        c.helper_peak_kb = _peak_kb()
        return c.to_json()
    raise CompileError(f"bcc could not compile the program ({err})")


def _peak_kb() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _die_with_parent() -> None:
    """The helper must not outlive a tracer killed mid-compile. Set here
    rather than in a preexec_fn, which subprocess documents as unsafe once
    the parent has threads."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.environ.get("EPIPE_TRACE_PARENT") not in (None, str(os.getppid())):
        os._exit(1)                                     # it died before prctl


def main() -> int:
    _die_with_parent()
    req = json.loads(sys.stdin.read())
    try:
        out = _compile(req["text"], req["variants"])
    except CompileError as e:
        # clang's diagnostics went to stderr: the parent quotes the errors
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
