"""A kernel header tree for bcc, real or generated from BTF.

bcc compiles every program against a kernel source tree (``BCC_KERNEL_SOURCE``
or ``/lib/modules/$(uname -r)/build``). Kernels without headers but with BTF
(microVMs, minimal cloud images) get a tree generated here:

* ``bpftool btf dump ... format c`` gives every type with this kernel's layout;
* declarations that bcc's own injected ``bpf.h``/``helpers.h`` also define are
  left out (clang would report redefinitions) -- bcc's copies are read out of
  ``libbcc.so`` itself, so the filter follows whatever bcc is installed;
* a few small hand-written headers stand where bcc expects kernel ones, and
  every kernel header our BPF C includes is a stub that pulls in the dump, so
  the same program text compiles against real and generated trees;
* the dump is also cut to what the program can reach (``prune_dump``): the
  types its text and bcc's headers name, and what those embed by value
  (pointers need only a forward declaration). 4% of the text, so clang
  parses 115 KB instead of 2.8 MB: half the compile time, 35 MB less peak
  memory. The full dump stays beside it; the loader falls back to it if the
  cut one ever fails to compile.

The tree is cached per (kernel release, BTF hash, bcc build, generator version)
and written to a temporary directory that is renamed into place, so an
interrupted run never leaves a half tree; a manifest of file hashes lets a
corrupted cache be detected and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .capabilities import KernelCapabilities, read_kernel_config

GENERATOR_VERSION = "4"
DEFAULT_CACHE = Path(os.environ.get("EPIPE_TRACE_CACHE", "/var/cache/epipe-trace"))

# Kernel headers the BPF C includes; in a generated tree each is a stub.
STUB_HEADERS = (
    "net/sock.h", "net/inet_sock.h", "net/tcp_states.h", "linux/tcp.h", "linux/sched.h",
    "linux/fdtable.h", "linux/fs.h", "linux/pipe_fs_i.h", "net/af_unix.h", "linux/socket.h",
    "linux/signal.h", "linux/ptrace.h", "uapi/linux/ptrace.h",
    "uapi/linux/bpf.h", "uapi/linux/if_packet.h", "linux/net.h", "linux/un.h",
)


class HeaderError(Exception):
    """No usable header tree can be had; the message says what to install."""


@dataclass
class HeaderTree:
    path: str
    kind: str           # "kernel-headers" | "btf-generated"
    cached: bool        # True when an existing generated tree was reused
    seconds: float      # time spent producing it (0 for real headers)
    key: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "cached": self.cached,
                "seconds": round(self.seconds, 3), "key": self.key}


# --- what bcc defines itself --------------------------------------------------

def libbcc_path() -> Path | None:
    """The libbcc.so the bcc module would load ("libbcc.so.0" through the
    dynamic loader), found without loading it: loading it maps LLVM."""
    try:
        for line in open("/proc/self/maps"):     # already loaded (the compile helper)
            if "libbcc.so" in line and "libbcc_bpf" not in line:
                return Path(line.split()[-1])
    except OSError:
        pass
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    arch = "x86-64" if platform.machine() == "x86_64" else platform.machine()
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" (")
        if name == "libbcc.so.0" and "=>" in rest and (arch in rest or "x86-64" not in rest):
            return Path(rest.split("=>", 1)[1].strip()).resolve()
    for cand in ("/usr/lib/x86_64-linux-gnu/libbcc.so.0", "/usr/lib/aarch64-linux-gnu/libbcc.so.0",
                 "/usr/lib64/libbcc.so.0", "/usr/lib/libbcc.so.0"):
        if Path(cand).exists():
            return Path(cand).resolve()
    return None


def _embedded_string(blob: bytes, marker: bytes) -> str:
    i = blob.find(marker)
    if i < 0:
        return ""
    start = blob.rfind(b"\0", 0, i) + 1
    end = blob.find(b"\0", i)
    return blob[start:end].decode("utf-8", "replace")


def bcc_embedded_headers(lib: Path) -> str:
    """bcc's compiled-in bpf.h and helpers.h, concatenated."""
    blob = lib.read_bytes()
    return "\n".join(_embedded_string(blob, m) for m in
                     (b"#define _UAPI__LINUX_BPF_H__", b"#define __BPF_HELPERS_H"))


_COMMENT_RE = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_TAG_RE = re.compile(r"\b(struct|union|enum)\s+(\w+)\s*\{")
_ENUM_BODY_RE = re.compile(r"\benum\b[^{;]*\{([^}]*)\}", re.S)


def _enumerators(body: str) -> set[str]:
    names = set()
    for item in body.split(","):
        item = item.strip()
        if item:
            m = re.match(r"(\w+)", item)
            if m:
                names.add(m.group(1))
    return names


_DEFINE_RE = re.compile(r"^\s*#\s*define\s+(\w+)", re.M)


def defined_names(c_text: str) -> tuple[set[str], set[str]]:
    """(struct/union/enum tags, enumerator and macro names) a C text defines.

    Macros count with enumerators: an enumerator spelled like one of bcc's
    macros would be macro-expanded into a syntax error.
    """
    text = _COMMENT_RE.sub(" ", c_text)
    tags = {f"{k} {n}" for k, n in _TAG_RE.findall(text)}
    names: set[str] = set(_DEFINE_RE.findall(text))
    for body in _ENUM_BODY_RE.findall(text):
        names |= _enumerators(body)
    return tags, names


# --- splitting and filtering the BTF dump ----------------------------------------

def split_toplevel(c_text: str) -> list[str]:
    """Split bpftool's C dump into top-level declarations (keeps other lines)."""
    decls, cur, depth = [], [], 0
    for line in c_text.splitlines():
        cur.append(line)
        depth += line.count("{") - line.count("}")
        stripped = line.rstrip()
        if depth == 0 and (stripped.endswith(";") or stripped.startswith("#") or not stripped):
            decls.append("\n".join(cur))
            cur = []
    if cur:
        decls.append("\n".join(cur))
    return decls


def filter_dump(dump: str, bcc_tags: set[str], bcc_enums: set[str]) -> tuple[str, int]:
    """Drop declarations bcc also defines; returns (text, how many dropped)."""
    kept, dropped = [], 0
    for decl in split_toplevel(dump):
        body = decl.strip()
        if "preserve_access_index" in body or body.startswith("#pragma clang attribute pop"):
            continue  # bcc does no CO-RE relocation: plain offsets from this BTF are exact
        m = _TAG_RE.search(body)
        clash = False
        if m and body.startswith(("struct", "union", "enum", "typedef struct", "typedef union",
                                  "typedef enum")):
            if f"{m.group(1)} {m.group(2)}" in bcc_tags:
                clash = True
        if not clash and re.match(r"(typedef\s+)?enum\b", body):
            # bpftool writes every enumerator with its value on a line of its
            # own, so clashing ones can go without renumbering the rest
            em = _ENUM_BODY_RE.search(body)
            clashing = _enumerators(em.group(1)) & bcc_enums if em else set()
            if clashing:
                lines = [ln for ln in decl.splitlines()
                         if not (m2 := re.match(r"\s+(\w+)\s*(=|,|$)", ln)) or m2.group(1) not in clashing]
                decl = "\n".join(lines)
                em2 = _ENUM_BODY_RE.search(decl)
                if not em2 or not _enumerators(em2.group(1)):
                    clash = True
                dropped += 0 if clash else 1
        if clash:
            dropped += 1
        else:
            kept.append(decl)
    return "\n".join(kept) + "\n", dropped


# --- cutting the dump to what a program uses ---------------------------------------

_REF_RE = re.compile(r"\b(struct|union|enum)\s+(\w+)(\s*\*)?")
_IDENT_RE = re.compile(r"\b[A-Za-z_]\w*\b")
_DEF_TAG_RE = re.compile(r"^(?:typedef\s+)?(struct|union|enum)\s+(\w+)\s*\{")
_FNPTR_TYPEDEF_RE = re.compile(r"\(\s*\*\s*(\w+)\s*\)\s*\(")
_FN_TYPEDEF_RE = re.compile(r"typedef\s+[^(]*?\b(\w+)\s*\(")
_TYPEDEF_NAME_RE = re.compile(r"(\w+)\s*(?:\[[^\]]*\]\s*)*;\s*$")
# typedefs bcc's generated tracepoint structs and our C use without naming
# them in the text the cut sees
ALWAYS_KEEP = ("u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "__u8", "__u16",
               "__u32", "__u64", "__s8", "__s16", "__s32", "__s64", "__be16", "__be32",
               "__le16", "__le32", "pid_t", "size_t", "ssize_t", "bool", "uid_t", "gid_t",
               "loff_t", "dev_t", "umode_t", "gfp_t", "uintptr_t")


def _decl_names(body: str) -> set[str]:
    """What one top-level declaration defines: 'struct x' tags, typedef names."""
    names = set()
    m = _DEF_TAG_RE.match(body)
    if m:
        names.add(f"{m.group(1)} {m.group(2)}")
    if body.startswith("typedef"):
        # a function (pointer) typedef names itself before its parameters;
        # any other typedef, struct bodies included, names itself last
        fn = "{" not in body and (_FNPTR_TYPEDEF_RE.search(body) or _FN_TYPEDEF_RE.match(body))
        m = fn or _TYPEDEF_NAME_RE.search(body)
        if m:
            names.add(m.group(1))
    return names


def _decl_refs(body: str, typedefs: set[str]) -> tuple[set[str], set[str]]:
    """(needed complete, needed declared only): a struct reached through a
    pointer or in a function pointer's signature needs no definition."""
    strong, weak = set(), set()
    for line in body.splitlines():
        fnptr = "(*" in line.replace(" ", "")
        for m in _REF_RE.finditer(line):
            key = f"{m.group(1)} {m.group(2)}"
            if m.group(1) != "enum" and (m.group(3) or fnptr):
                weak.add(key)
            else:
                strong.add(key)
        strong.update(t for t in _IDENT_RE.findall(line) if t in typedefs)
    return strong, weak


def prune_dump(dump: str, roots_text: str, always: tuple[str, ...] = ALWAYS_KEEP) -> str:
    """The declarations of ``dump`` (bpftool's C, in its dependency order)
    that ``roots_text`` reaches, with forward declarations for the rest it
    points to. Over-keeping is harmless; under-keeping fails the compile,
    which the loader answers by using the full dump."""
    decls = []
    typedefs: set[str] = set()
    for d in split_toplevel(dump):
        body = d.strip()
        names = _decl_names(body)
        decls.append((d, body, names))
        typedefs |= {n for n in names if " " not in n}
    by_name: dict[str, list[int]] = {}
    for i, (_d, _b, names) in enumerate(decls):
        for n in names:
            by_name.setdefault(n, []).append(i)
    strong, weak = _decl_refs(roots_text, typedefs)
    work = list(strong | weak | set(always))
    need: set[int] = set()
    seen: set[str] = set()
    pointed: set[str] = set()
    while work:
        name = work.pop()
        if name in seen:
            continue
        seen.add(name)
        for i in by_name.get(name, ()):
            if i not in need:
                need.add(i)
                st, wk = _decl_refs(decls[i][1], typedefs)
                work.extend(st)
                pointed |= wk
    defined = set().union(*(decls[i][2] for i in need)) if need else set()
    fwd = sorted(f"{n};" for n in pointed - defined if not n.startswith("enum "))
    out = []
    for i, (d, body, names) in enumerate(decls):
        is_fwd = body.startswith(("struct ", "union ")) and body.endswith(";") and "{" not in body
        other = not names and not body.startswith(("struct", "union", "enum", "typedef"))
        if i in need or is_fwd or other:
            out.append(d)
    return "\n".join(fwd) + "\n" + "\n".join(out) + "\n"


def _strip_pragmas(dump: str) -> str:
    out = []
    skip = 0
    for line in dump.splitlines():
        if line.startswith("#ifndef BPF_NO_PRESERVE_ACCESS_INDEX"):
            skip = 3
        if skip:
            skip -= 1
            continue
        out.append(line)
    return "\n".join(out) + "\n"


# --- small hand-written headers -------------------------------------------------

def _kconfig_h(config: dict[str, str]) -> str:
    lines = ["#ifndef __EPIPE_KCONFIG_H", "#define __EPIPE_KCONFIG_H"]
    for k, v in sorted(config.items()):
        if v == "y":
            lines.append(f"#define {k} 1")
        elif v == "m":
            lines.append(f"#define {k}_MODULE 1")
        elif re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", v):
            lines.append(f"#define {k} {v}")
        elif v.startswith('"'):
            lines.append(f"#define {k} {v}")
    lines += [
        "#define __ARG_PLACEHOLDER_1 0,",
        "#define __take_second_arg(__ignored, val, ...) val",
        "#define __is_defined(x) ___is_defined(x)",
        "#define ___is_defined(val) ____is_defined(__ARG_PLACEHOLDER_##val)",
        "#define ____is_defined(arg1_or_junk) __take_second_arg(arg1_or_junk 1, 0)",
        "#define IS_BUILTIN(option) __is_defined(option)",
        "#define IS_MODULE(option) __is_defined(option##_MODULE)",
        "#define IS_ENABLED(option) (IS_BUILTIN(option) || IS_MODULE(option))",
        "#endif",
    ]
    return "\n".join(lines) + "\n"


def _version_h(release: str) -> str:
    nums = [int(x) for x in re.findall(r"\d+", release)[:3]] + [0, 0, 0]
    a, b, c = nums[0], nums[1], min(nums[2], 255)
    return (f"#define LINUX_VERSION_CODE {(a << 16) + (b << 8) + c}\n"
            "#define KERNEL_VERSION(a,b,c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))\n"
            f"#define LINUX_VERSION_MAJOR {a}\n#define LINUX_VERSION_PATCHLEVEL {b}\n"
            f"#define LINUX_VERSION_SUBLEVEL {c}\n")


_TYPES_H = """#ifndef _EPIPE_LINUX_TYPES_H
#define _EPIPE_LINUX_TYPES_H
/* bcc's bpf.h includes this before anything else: only the uapi typedefs. */
typedef signed char __s8;
typedef unsigned char __u8;
typedef short int __s16;
typedef short unsigned int __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long int __s64;
typedef long long unsigned int __u64;
typedef __u16 __le16;
typedef __u16 __be16;
typedef __u32 __le32;
typedef __u32 __be32;
typedef __u64 __le64;
typedef __u64 __be64;
typedef __u16 __sum16;
typedef __u32 __wsum;
#define __aligned_u64 __u64 __attribute__((aligned(8)))
#endif
"""

_BPF_COMMON_H = """#ifndef _UAPI__LINUX_BPF_COMMON_H__
#define _UAPI__LINUX_BPF_COMMON_H__
#define BPF_CLASS(code) ((code) & 0x07)
#define BPF_LD 0x00
#define BPF_LDX 0x01
#define BPF_ST 0x02
#define BPF_STX 0x03
#define BPF_ALU 0x04
#define BPF_JMP 0x05
#define BPF_RET 0x06
#define BPF_MISC 0x07
#define BPF_SIZE(code) ((code) & 0x18)
#define BPF_W 0x00
#define BPF_H 0x08
#define BPF_B 0x10
#define BPF_MODE(code) ((code) & 0xe0)
#define BPF_IMM 0x00
#define BPF_ABS 0x20
#define BPF_IND 0x40
#define BPF_MEM 0x60
#define BPF_LEN 0x80
#define BPF_MSH 0xa0
#define BPF_OP(code) ((code) & 0xf0)
#define BPF_ADD 0x00
#define BPF_SUB 0x10
#define BPF_MUL 0x20
#define BPF_DIV 0x30
#define BPF_OR 0x40
#define BPF_AND 0x50
#define BPF_LSH 0x60
#define BPF_RSH 0x70
#define BPF_NEG 0x80
#define BPF_MOD 0x90
#define BPF_XOR 0xa0
#define BPF_JA 0x00
#define BPF_JEQ 0x10
#define BPF_JGT 0x20
#define BPF_JGE 0x30
#define BPF_JSET 0x40
#define BPF_SRC(code) ((code) & 0x08)
#define BPF_K 0x00
#define BPF_X 0x08
#ifndef BPF_MAXINSNS
#define BPF_MAXINSNS 4096
#endif
#endif
"""

_PAGE_H = """#ifndef _EPIPE_ASM_PAGE_H
#define _EPIPE_ASM_PAGE_H
#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#define PAGE_MASK (~(PAGE_SIZE - 1))
#endif
"""

# bcc's helpers use roundup_pow_of_two() in map sizes (BPF_STACK_TRACE): it
# must stay a constant expression, as the kernel's macro is.
_LOG2_H = """#ifndef _EPIPE_LINUX_LOG2_H
#define _EPIPE_LINUX_LOG2_H
#include <epipe/vmlinux.h>
#define ilog2(n) ((n) < 2 ? 0 : 63 - __builtin_clzll((unsigned long long)(n)))
#define roundup_pow_of_two(n) \\
    ((n) <= 1 ? 1UL : (1UL << (64 - __builtin_clzll((unsigned long long)(n) - 1))))
#endif
"""

_STUB = """/* generated by epipe-trace: the kernel's types come from its BTF */
#ifdef EPIPE_FULL_VMLINUX
#include <epipe/vmlinux-full.h>
#else
#include <epipe/vmlinux.h>
#endif
"""
FULL_VMLINUX_DEFINE = "-DEPIPE_FULL_VMLINUX"


def _generated_vmlinux_h(filtered: str, what: str) -> str:
    # one guard for both: whichever a compile includes first is the only one
    return ("#ifndef __EPIPE_VMLINUX_H__\n#define __EPIPE_VMLINUX_H__\n"
            "/* generated by epipe-trace from /sys/kernel/btf/vmlinux; bcc's own\n"
            f" * bpf.h/helpers.h declarations are left out; {what} */\n"
            + filtered + "#endif\n")


# --- the cache -------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(caps: KernelCapabilities, lib: Path | None, roots_text: str = "") -> str:
    btf_hash = _sha256(Path(caps.btf_path))[:16] if caps.btf_path else "nobtf"
    lib_hash = hashlib.sha256(f"{lib}:{lib.stat().st_size}:{lib.stat().st_mtime_ns}".encode()
                              ).hexdigest()[:8] if lib else "nolib"
    safe_rel = re.sub(r"[^A-Za-z0-9._-]", "_", caps.release)
    prog = hashlib.sha256(roots_text.encode()).hexdigest()[:8] if roots_text else "all"
    return f"{safe_rel}-{btf_hash}-bcc{lib_hash}-p{prog}-g{GENERATOR_VERSION}"


def _manifest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "MANIFEST.json":
            out[str(p.relative_to(root))] = _sha256(p)
    return out


def verify_tree(root: Path) -> bool:
    """True when every file listed in the manifest is present and unchanged."""
    try:
        manifest = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or "include/epipe/vmlinux.h" not in manifest:
        return False
    try:
        return manifest == _manifest(root)
    except OSError:
        return False


def _config_full(caps: KernelCapabilities) -> dict[str, str]:
    """The kernel's CONFIG_* (see capabilities.read_kernel_config). When no
    config can be found at all, a kernel that has BTF and lets us load BPF
    certainly has the BPF syscall, which bcc's helpers.h insists on."""
    cfg = read_kernel_config(caps.release)
    if not cfg:
        cfg = {"CONFIG_BPF_SYSCALL": "y", "CONFIG_BPF": "y", "CONFIG_DEBUG_INFO_BTF": "y"}
    return cfg


def generate_tree(caps: KernelCapabilities, dest: Path, lib: Path | None,
                  bpftool: str = "bpftool", roots_text: str = "") -> dict:
    """Write a complete generated tree into ``dest`` (which must not exist).
    ``roots_text``: the program to be compiled; vmlinux.h is cut to what it
    reaches (empty: not cut)."""
    try:
        dump = subprocess.run([bpftool, "btf", "dump", "file", caps.btf_path, "format", "c"],
                              check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as e:
        raise HeaderError("bpftool is not installed: install it (Debian: apt-get install bpftool)"
                          ) from e
    except subprocess.CalledProcessError as e:
        raise HeaderError(f"bpftool could not dump {caps.btf_path}: {e.stderr.strip()[:200]}") from e
    bcc_text = bcc_embedded_headers(lib) if lib else ""
    tags, enums = defined_names(bcc_text)
    filtered, dropped = filter_dump(_strip_pragmas(dump), tags, enums)
    cut = prune_dump(filtered, roots_text + "\n" + bcc_text) if roots_text else filtered
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(caps.machine, caps.machine)
    files = {
        "include/epipe/vmlinux.h": _generated_vmlinux_h(
            cut, "cut to what the program reaches" if roots_text else "complete"),
        "include/epipe/vmlinux-full.h": _generated_vmlinux_h(filtered, "complete"),
        "include/linux/kconfig.h": _kconfig_h(_config_full(caps)),
        "include/linux/version.h": _version_h(caps.release),
        "include/generated/uapi/linux/version.h": _version_h(caps.release),
        "include/linux/types.h": _TYPES_H,
        "include/linux/bpf_common.h": _BPF_COMMON_H,
        "include/uapi/linux/bpf_common.h": _BPF_COMMON_H,
        f"arch/{arch}/include/asm/page.h": _PAGE_H,
        "include/linux/log2.h": _LOG2_H,
    }
    for h in STUB_HEADERS:
        files.setdefault(f"include/{h}", _STUB)
    for rel, text in files.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    info = {"release": caps.release, "btf": caps.btf_path, "bcc_lib": str(lib),
            "declarations_dropped": dropped, "generator": GENERATOR_VERSION,
            "vmlinux_h_bytes": len(cut), "vmlinux_full_h_bytes": len(filtered)}
    (dest / "EPIPE-TREE.json").write_text(json.dumps(info, indent=1) + "\n")
    (dest / "MANIFEST.json").write_text(json.dumps(_manifest(dest), indent=0) + "\n")
    return info


def prepare(caps: KernelCapabilities, cache_dir: Path = DEFAULT_CACHE,
            prefer: str = "auto", roots_text: str = "") -> HeaderTree:
    """Real headers when the kernel has them, else a cached BTF-generated tree.

    ``prefer`` is "auto", "kernel" (fail without real headers) or "btf"
    (always generate, useful to test the generated tree on a kernel with headers).
    ``roots_text`` is the program that will be compiled (the tree is cut to it).
    """
    import time
    if caps.headers_dir and prefer in ("auto", "kernel"):
        return HeaderTree(caps.headers_dir, "kernel-headers", cached=True, seconds=0.0)
    if prefer == "kernel":
        raise HeaderError(f"no kernel headers at /lib/modules/{caps.release}/build: install "
                          f"linux-headers-{caps.release}")
    if not caps.btf:
        raise HeaderError(
            f"no kernel headers at /lib/modules/{caps.release}/build and no BTF at "
            f"/sys/kernel/btf/vmlinux: install linux-headers-{caps.release} "
            "(or boot a kernel built with CONFIG_DEBUG_INFO_BTF=y)")
    t0 = time.monotonic()
    lib = libbcc_path()
    key = cache_key(caps, lib, roots_text)
    root = cache_dir / "headers"
    final = root / key
    if final.is_dir():
        if verify_tree(final):
            return HeaderTree(str(final), "btf-generated", cached=True,
                              seconds=time.monotonic() - t0, key=key)
        shutil.rmtree(final, ignore_errors=True)   # corrupt or partial: rebuild
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    except OSError as e:
        raise HeaderError(f"cannot write the header cache under {root}: {e.strerror}; "
                          "set EPIPE_TRACE_CACHE to a writable directory") from e
    try:
        generate_tree(caps, tmp, lib, roots_text=roots_text)
        try:
            os.rename(tmp, final)
        except OSError:
            # another instance won the race; use its tree if it is whole
            shutil.rmtree(tmp, ignore_errors=True)
            if not verify_tree(final):
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # stale trees of other kernels/bcc builds: keep the newest few only
    others = sorted((p for p in root.iterdir() if p.is_dir() and p.name != key
                     and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    for old in others[:-3]:
        shutil.rmtree(old, ignore_errors=True)
    return HeaderTree(str(final), "btf-generated", cached=False,
                      seconds=time.monotonic() - t0, key=key)
