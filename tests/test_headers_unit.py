"""Unit tests for the header-tree generator's filtering of bpftool's dump."""
from __future__ import annotations

from tracer import headers
from tracer.headers import defined_names, filter_dump, split_toplevel, verify_tree

BCC = """
/* struct example_in_a_comment { int x; }; */
#define BPF_F_FOO (1U << 0)
struct bpf_map_def { int a; };
enum bpf_prog_type { BPF_PROG_TYPE_UNSPEC, BPF_PROG_TYPE_SOCKET_FILTER };
"""

DUMP = """typedef unsigned int __u32;

struct bpf_map_def {
\tint a;
};

struct sock {
\tint sk_err;
\tstruct {
\t\tint inner;
\t} nested;
};

struct example_in_a_comment {
\tint y;
};

enum bpf_prog_type {
\tBPF_PROG_TYPE_UNSPEC = 0,
\tBPF_PROG_TYPE_SOCKET_FILTER = 1,
};

enum {
\tBPF_F_FOO = 1,
\tBPF_F_BAR = 2,
};

enum {
\tBPF_F_FOO_ONLY = 4,
};
"""


def test_defined_names_ignores_comments_and_collects_macros():
    tags, names = defined_names(BCC)
    assert "struct bpf_map_def" in tags and "enum bpf_prog_type" in tags
    assert "struct example_in_a_comment" not in tags
    assert {"BPF_F_FOO", "BPF_PROG_TYPE_UNSPEC"} <= names


def test_split_keeps_nested_struct_whole():
    decls = [d.strip() for d in split_toplevel(DUMP) if d.strip()]
    sock = [d for d in decls if d.startswith("struct sock {")]
    assert len(sock) == 1 and "inner" in sock[0] and sock[0].endswith("};")


def test_filter_drops_bcc_definitions_and_clashing_enumerators_only():
    tags, names = defined_names(BCC)
    out, dropped = filter_dump(DUMP, tags, names)
    assert "struct bpf_map_def {" not in out            # bcc defines it
    assert "enum bpf_prog_type {" not in out
    assert "struct sock {" in out and "struct example_in_a_comment {" in out
    assert "BPF_F_BAR = 2" in out                        # kept, value explicit
    assert "BPF_F_FOO = 1" not in out                    # would expand to (1U << 0)
    assert "BPF_F_FOO_ONLY" in out
    assert dropped >= 3


def test_verify_tree_detects_corruption(tmp_path):
    import json
    (tmp_path / "include" / "epipe").mkdir(parents=True)
    f = tmp_path / "include" / "epipe" / "vmlinux.h"
    f.write_text("struct x { int a; };\n")
    from tracer.headers import _manifest
    (tmp_path / "MANIFEST.json").write_text(json.dumps(_manifest(tmp_path)))
    assert verify_tree(tmp_path)
    f.write_text("struct x { int a; ")                   # truncated by a crash or a disk
    assert not verify_tree(tmp_path)


def test_prune_keeps_what_the_program_reaches_by_value_and_declares_pointees():
    dump = """struct big;
struct list_head {
\tstruct list_head *next;
};
typedef unsigned int u32;
typedef void __signalfn_t(int);
typedef __signalfn_t *__sighandler_t;
struct inner {
\tu32 a;
\t__sighandler_t h;
};
struct unused {
\tint z;
};
struct big {
\tstruct unused u;
};
enum kind {
\tK_A = 0,
};
struct outer {
\tstruct inner in;
\tstruct big *p;
\tvoid (*cb)(struct unused2 *, struct big);
\tenum kind k;
\tstruct list_head l;
};
"""
    cut = headers.prune_dump(dump, "int f(struct outer *o) { return o->in.a; }", always=())
    for kept in ("struct outer {", "struct inner {", "typedef unsigned int u32;",
                 "typedef __signalfn_t *__sighandler_t;", "typedef void __signalfn_t(int);",
                 "enum kind {", "struct list_head {"):
        assert kept in cut, kept
    assert "struct big {" not in cut and "struct unused {" not in cut    # only pointed to
    assert "struct unused2;" in cut and "struct big;" in cut            # declared, not defined
    assert cut.index("struct inner {") < cut.index("struct outer {")     # dump order kept
