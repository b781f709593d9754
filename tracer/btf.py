"""A minimal reader for the kernel's BTF (/sys/kernel/btf/vmlinux).

The probe plan must check function signatures against the *running* kernel
(``tcp_reset`` gained its ``skb`` argument in 5.x), and the fentry probe needs
the BTF id of a function. Both need only FUNC -> FUNC_PROTO -> params, so this
reads the type section once and keeps just what answers those questions.
Format: Documentation/bpf/btf.rst.
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
# kind -> size in bytes of the data that follows the 12-byte btf_type header
_KIND_INT, _KIND_PTR, _KIND_ARRAY, _KIND_STRUCT, _KIND_UNION, _KIND_ENUM = 1, 2, 3, 4, 5, 6
_KIND_FWD, _KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT = 7, 8, 9, 10, 11
_KIND_FUNC, _KIND_FUNC_PROTO, _KIND_VAR, _KIND_DATASEC, _KIND_FLOAT = 12, 13, 14, 15, 16
_KIND_DECL_TAG, _KIND_TYPE_TAG, _KIND_ENUM64 = 17, 18, 19


class BTFError(Exception):
    """The BTF blob is missing or not something this reader understands."""


@dataclass(frozen=True)
class FuncSignature:
    name: str
    btf_id: int
    params: tuple[tuple[str, str], ...]  # (param name, C type spelled loosely)

    def param_types(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.params)


class BTF:
    """Index of one BTF blob: enough to name types and find functions."""

    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise BTFError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise BTFError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        s0 = hdr_len + str_off
        self._strings = blob[s0:s0 + str_len]
        self._blob = blob
        # per type id: kind, name_off, info_vlen, size_or_type, data_offset,
        # in flat arrays (~150k types: a tuple each would cost ~25 MB of RSS)
        self._kind, self._name = array("B", [0]), array("I", [0])
        self._vlen, self._ref, self._data = array("I", [0]), array("I", [0]), array("I", [0])
        self._funcs: dict[str, int] = {}
        self._index()

    @classmethod
    def from_file(cls, path: Path = VMLINUX_BTF) -> "BTF":
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise BTFError(f"cannot read {path}: {e.strerror}") from e

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _index(self) -> None:
        b, off, end = self._blob, self._types_start, self._types_end
        while off < end:
            name_off, info, size_type = struct.unpack_from("<III", b, off)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            data = off + 12
            if kind in (_KIND_INT,):
                extra = 4
            elif kind == _KIND_ARRAY:
                extra = 12
            elif kind in (_KIND_STRUCT, _KIND_UNION):
                extra = 12 * vlen
            elif kind == _KIND_ENUM:
                extra = 8 * vlen
            elif kind == _KIND_ENUM64:
                extra = 12 * vlen
            elif kind == _KIND_FUNC_PROTO:
                extra = 8 * vlen
            elif kind == _KIND_VAR:
                extra = 4
            elif kind == _KIND_DATASEC:
                extra = 12 * vlen
            elif kind == _KIND_DECL_TAG:
                extra = 4
            elif kind in (_KIND_PTR, _KIND_FWD, _KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST,
                          _KIND_RESTRICT, _KIND_FUNC, _KIND_FLOAT, _KIND_TYPE_TAG):
                extra = 0
            else:
                raise BTFError(f"unknown BTF kind {kind}")
            self._kind.append(kind)
            self._name.append(name_off)
            self._vlen.append(vlen)
            self._ref.append(size_type)
            self._data.append(data)
            if kind == _KIND_FUNC:
                self._funcs.setdefault(self._str(name_off), len(self._kind) - 1)
            off = data + extra

    def type_name(self, tid: int, depth: int = 0) -> str:
        """Spell a type the way C would, loosely (qualifiers dropped)."""
        if tid == 0:
            return "void"
        if depth > 16:
            return "?"
        kind, size_type = self._kind[tid], self._ref[tid]
        name = self._str(self._name[tid])
        if kind == _KIND_PTR:
            return self.type_name(size_type, depth + 1) + " *"
        if kind in (_KIND_CONST, _KIND_VOLATILE, _KIND_RESTRICT, _KIND_TYPE_TAG):
            return self.type_name(size_type, depth + 1)
        if kind == _KIND_STRUCT:
            return f"struct {name}"
        if kind == _KIND_UNION:
            return f"union {name}"
        if kind in (_KIND_ENUM, _KIND_ENUM64):
            return f"enum {name}"
        if kind == _KIND_FWD:
            return f"struct {name}"
        if kind == _KIND_FUNC_PROTO:
            return "fn"
        return name or "?"

    def func(self, name: str) -> FuncSignature | None:
        tid = self._funcs.get(name)
        if tid is None:
            return None
        proto_id = self._ref[tid]
        vlen, data = self._vlen[proto_id], self._data[proto_id]
        if self._kind[proto_id] != _KIND_FUNC_PROTO:
            return None
        params = []
        for i in range(vlen):
            p_name_off, p_type = struct.unpack_from("<II", self._blob, data + 8 * i)
            params.append((self._str(p_name_off), self.type_name(p_type)))
        return FuncSignature(name, tid, tuple(params))
