"""Read a GGUF file's header fast: metadata and tensor layout, without the array payloads.

`gguf.GGUFReader` turns every element of every metadata array into numpy objects, which takes
seconds for a large vocabulary. This reader walks the same header with `struct` over a read-only
mmap, keeps scalar values, array lengths and small numeric arrays (per-layer hyperparameters),
steps over everything else, and checks the file so that a broken download fails with one line.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from collections import Counter
from itertools import repeat
from typing import NamedTuple, NoReturn

import gguf
from gguf import GGMLQuantizationType, GGUFValueType, Keys

from ..errors import ModelFileError
from .info import GGUFInfo

_MAGIC = struct.pack("<I", gguf.GGUF_MAGIC)  # b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 share one layout
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME_BYTES = 65535  # the spec's limit for a key; far above any tensor name
_MAX_STRING_VALUE = 1 << 20  # longer metadata strings (an embedded tokenizer.json) are summarised
_SMALL_ARRAY = 4096  # numeric arrays up to this length keep their values (per-layer head counts)
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")
_OUTPUT_PREFIXES = ("output.", "output_norm.")

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32,
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: _U64,
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# Smallest encoding of one array item: a string is at least its 8-byte length, an array its
# 4-byte type and 8-byte count.
_MIN_ITEM_BYTES = {
    **{t: s.size for t, s in _SCALARS.items()},
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 12,
}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

Scalar = str | int | float | bool


class _Array(NamedTuple):
    """A metadata array: its item type, its length and, for small numeric arrays, its values."""

    item_type: GGUFValueType
    length: int
    values: tuple[int | float | bool, ...] | None

    def summary(self) -> str:
        return f"[array of {self.length} {self.item_type.name.lower()}]"


class _Tensor(NamedTuple):
    name: str
    ggml_type: GGMLQuantizationType
    n_elements: int
    n_bytes: int
    offset: int


class _Cursor:
    """A position in the mapped file; every read is bounds-checked and fails as ModelFileError."""

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, message: str) -> NoReturn:
        raise ModelFileError(f"{self.path}: {message}")

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            self.fail(
                f"truncated or corrupt header: {what} at byte {self.pos} needs {n} bytes, only {left} left in the file"
            )

    def unpack(self, fmt: struct.Struct, what: str) -> int | float | bool:
        self.need(fmt.size, what)
        value: int | float | bool = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def uint(self, fmt: struct.Struct, what: str) -> int:
        return int(self.unpack(fmt, what))

    def text(self, n: int) -> str:
        value = self.buf[self.pos : self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return value

    def name(self, what: str) -> str:
        """A metadata key or tensor name."""
        n = self.uint(_U64, what)
        if n > _MAX_NAME_BYTES:
            self.fail(f"corrupt header: {what} at byte {self.pos - 8} claims {n} bytes")
        self.need(n, what)
        return self.text(n)

    def value_type(self, key: str) -> GGUFValueType:
        code = self.uint(_U32, f"the value type of {key}")
        try:
            return GGUFValueType(code)
        except ValueError:
            self.fail(f"corrupt header: unknown value type {code} for metadata key {key}")

    def value(self, vtype: GGUFValueType, key: str) -> Scalar | _Array:
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        if vtype == GGUFValueType.STRING:
            n = self.uint(_U64, f"the value of {key}")
            self.need(n, f"the value of {key}")
            if n > _MAX_STRING_VALUE:
                self.pos += n
                return f"[string of {n} bytes]"
            return self.text(n)
        return self.unpack(_SCALARS[vtype], f"the value of {key}")

    def array(self, key: str) -> _Array:
        item_type = self.value_type(key)
        count = self.uint(_U64, f"the length of {key}")
        left = self.size - self.pos
        if count * _MIN_ITEM_BYTES[item_type] > left:
            self.fail(
                f"truncated or corrupt header: array {key} claims {count} items, "
                f"more than the {left} bytes left in the file can hold"
            )
        values = None
        if item_type == GGUFValueType.STRING:
            self.skip_strings(count, key)
        elif item_type == GGUFValueType.ARRAY:
            for _ in range(count):
                self.array(key)
        else:
            fmt = _SCALARS[item_type]
            if count <= _SMALL_ARRAY:
                values = struct.unpack_from(f"<{count}{fmt.format[-1]}", self.buf, self.pos)
            self.pos += count * fmt.size
        return _Array(item_type, count, values)

    def skip_strings(self, count: int, key: str) -> None:
        """Step over `count` length-prefixed strings: the hot loop for a vocabulary."""
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        try:
            for _ in repeat(None, count):
                pos += unpack(buf, pos)[0] + 8
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size:
            self.fail(f"truncated or corrupt header: the strings of {key} run past the end of the file")
        self.pos = pos


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header of the GGUF file at `path` without loading its weights.

    Raises ModelFileError, with a one-line message, when the file is missing, unreadable, not
    GGUF, of an unsupported version, truncated or corrupt, or lacks what a language model needs.
    """
    path_str = os.fspath(path)
    try:
        st = os.stat(path_str)
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{path_str} is a directory, not a GGUF file")
        if st.st_size == 0:
            raise ModelFileError(f"{path_str} is empty (0 bytes)")
        with open(path_str, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path_str))
    except FileNotFoundError:
        raise ModelFileError(f"no such file: {path_str}") from None
    except PermissionError:
        raise ModelFileError(f"permission denied: {path_str}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {path_str}: {e}") from None


def _parse(cur: _Cursor) -> GGUFInfo:
    version = _check_preamble(cur)
    n_tensors = cur.uint(_U64, "the tensor count")
    n_kv = cur.uint(_U64, "the metadata count")
    left = cur.size - cur.pos
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
        cur.fail(
            f"truncated or corrupt header: it claims {n_tensors} tensors and {n_kv} metadata "
            f"entries, more than the {left} bytes after the counts can hold"
        )

    fields: dict[str, Scalar | _Array] = {}
    for _ in range(n_kv):
        key = cur.name("a metadata key")
        fields[key] = cur.value(cur.value_type(key), key)

    tensors = [_tensor_info(cur, i) for i in range(n_tensors)]

    alignment = fields.get(Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        cur.fail(f"corrupt header: {Keys.General.ALIGNMENT} is {alignment!r}, not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    end = max((data_offset + t.offset + t.n_bytes for t in tensors), default=0)
    if end > cur.size:
        cur.fail(
            f"truncated: the tensor data ends at byte {end} but the file has {cur.size} bytes "
            f"({_bytes(end - cur.size)} missing)"
        )
    return _info(cur, version, fields, tensors, data_offset)


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def _check_preamble(cur: _Cursor) -> int:
    """Check the magic and return the version: little-endian GGUF v2 or v3 only."""
    head = cur.buf[:8]
    if not head.startswith(_MAGIC):
        if _MAGIC.startswith(head[:4]):
            cur.fail(f"truncated: only {cur.size} bytes, not even a GGUF header")
        if head.startswith(b"version "):
            cur.fail("not a GGUF file but a Git LFS pointer (fetch the real file with `git lfs pull`)")
        cur.fail(f"not a GGUF file (it starts with {head!r}; a GGUF file starts with {_MAGIC!r})")
    cur.pos = len(_MAGIC)
    raw = cur.buf[cur.pos : cur.pos + 4]
    version = cur.uint(_U32, "the version")
    if version in _SUPPORTED_VERSIONS:
        return version
    if version & 0xFFFF == 0 and struct.unpack(">I", raw)[0] in _SUPPORTED_VERSIONS:
        cur.fail("big-endian GGUF files are not supported")
    cur.fail(f"unsupported GGUF version {version} (this reader supports versions 2 and 3)")


def _tensor_info(cur: _Cursor, index: int) -> _Tensor:
    name = cur.name(f"the name of tensor {index}")
    n_dims = cur.uint(_U32, f"the dimensions of tensor {name}")
    if n_dims > _MAX_DIMS:
        cur.fail(f"corrupt header: tensor {name} claims {n_dims} dimensions")
    cur.need(8 * n_dims, f"the shape of tensor {name}")
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    code = cur.uint(_U32, f"the type of tensor {name}")
    offset = cur.uint(_U64, f"the offset of tensor {name}")
    try:
        ggml_type = GGMLQuantizationType(code)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        cur.fail(f"tensor {name} has unknown ggml type {code} (a newer quantization? upgrade gguf)")
    n_elements = math.prod(shape)
    if shape and shape[0] % block_size:
        cur.fail(f"corrupt header: tensor {name} has {shape[0]} columns, not a multiple of {block_size}")
    return _Tensor(name, ggml_type, n_elements, n_elements // block_size * type_size, offset)


def _int_field(fields: dict[str, Scalar | _Array], key: str) -> int | None:
    """An integer hyperparameter; for a per-layer array, its largest value."""
    value = fields.get(key)
    if isinstance(value, _Array):
        return int(max(value.values)) if value.values else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


def _file_type_label(value: Scalar | _Array | None) -> str | None:
    """general.file_type as a quantization label: 15 (MOSTLY_Q4_K_M) -> "Q4_K_M"."""
    if type(value) is not int:
        return None
    try:
        name = gguf.LlamaFileType(value & ~gguf.LlamaFileType.GUESSED).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _info(
    cur: _Cursor, version: int, fields: dict[str, Scalar | _Array], tensors: list[_Tensor], data_offset: int
) -> GGUFInfo:
    arch = fields.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        cur.fail(f"no {Keys.General.ARCHITECTURE} in the metadata")

    def arch_int(template: str) -> int | None:
        return _int_field(fields, template.format(arch=arch))

    def required(template: str) -> int:
        value = arch_int(template)
        if value is None:
            cur.fail(f"no {template.format(arch=arch)} in the metadata (not a language model?)")
        return value

    block_count = required(Keys.LLM.BLOCK_COUNT)
    embedding_length = required(Keys.LLM.EMBEDDING_LENGTH)
    head_count = arch_int(Keys.Attention.HEAD_COUNT) or 0  # absent in attention-free models (Mamba)
    head_dim = embedding_length // head_count if head_count else 0

    tokens = fields.get(Keys.Tokenizer.LIST)
    vocab_size = tokens.length if isinstance(tokens, _Array) else arch_int(Keys.LLM.VOCAB_SIZE)
    if vocab_size is None:
        cur.fail(f"no {Keys.Tokenizer.LIST} in the metadata (a model without its tokenizer?)")

    layers: Counter[int] = Counter()
    input_bytes = output_bytes = token_embd_bytes = 0
    for t in tensors:
        block = _BLOCK_TENSOR.match(t.name)
        if block:
            layers[int(block[1])] += t.n_bytes
        elif t.name.startswith(_OUTPUT_PREFIXES):
            output_bytes += t.n_bytes
        else:
            input_bytes += t.n_bytes
            if t.name == "token_embd.weight":
                token_embd_bytes = t.n_bytes
    n_layers = max(block_count, max(layers, default=-1) + 1)

    template = fields.get(Keys.Tokenizer.CHAT_TEMPLATE)
    name = fields.get(Keys.General.NAME)
    return GGUFInfo(
        path=cur.path,
        file_size=cur.size,
        gguf_version=version,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=_file_type_label(fields.get(Keys.General.FILE_TYPE)),
        tensor_types=dict(Counter(t.ggml_type.name for t in tensors)),
        n_tensors=len(tensors),
        n_params=sum(t.n_elements for t in tensors),
        weights_bytes=sum(t.n_bytes for t in tensors),
        layer_bytes=[layers[i] for i in range(n_layers)],
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_tied=not any(t.name == "output.weight" for t in tensors),
        token_embd_bytes=token_embd_bytes,
        context_length=arch_int(Keys.LLM.CONTEXT_LENGTH),
        block_count=block_count,
        embedding_length=embedding_length,
        feed_forward_length=arch_int(Keys.LLM.FEED_FORWARD_LENGTH),
        head_count=head_count,
        head_count_kv=arch_int(Keys.Attention.HEAD_COUNT_KV) or head_count,
        key_length=arch_int(Keys.Attention.KEY_LENGTH) or head_dim,
        value_length=arch_int(Keys.Attention.VALUE_LENGTH) or head_dim,
        vocab_size=vocab_size,
        sliding_window=arch_int(Keys.Attention.SLIDING_WINDOW),
        chat_template=template if isinstance(template, str) else None,
        data_offset=data_offset,
        metadata={k: v.summary() if isinstance(v, _Array) else v for k, v in fields.items()},
    )
