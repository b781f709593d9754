"""epipe-trace: explain every broken pipe on a Linux host as it happens.

Modules in the order the data flows:
capabilities (what the kernel offers) -> btf (signatures) -> headers (a tree
for bcc) -> plan (hook -> mechanism) -> program (the C and its macros) ->
compiler (bcc, in a helper process; bytecode cached) -> loader (maps, load,
attach through bpfsys, libbcc_bpf without LLVM) -> events (decode) -> explain
(cause, fate) -> render (table, JSON, summary); session runs them, cli and
doctor face the user.
"""
__version__ = "0.1.0"
