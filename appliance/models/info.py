"""The shape of what we read from a GGUF file's header (filled in by `appliance.gguf_reader`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GGUFInfo(BaseModel):
    """Metadata and tensor layout of one GGUF file, read without loading the weights."""

    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None = None
    file_type: str | None = Field(None, description="quantization label from general.file_type, e.g. Q4_K_M")
    tensor_types: dict[str, int] = Field(default_factory=dict, description="ggml type name -> tensor count")
    n_tensors: int
    n_params: int
    weights_bytes: int = Field(description="sum of all tensor data bytes")
    layer_bytes: list[int] = Field(default_factory=list, description="tensor bytes of each repeating block blk.N")
    input_bytes: int = Field(0, description="token embedding (and other input) tensors: stay on the CPU in llama.cpp")
    output_bytes: int = Field(0, description="output head + output norm: offloaded only when every layer is")
    output_tied: bool = Field(
        False,
        description="no output.weight: llama.cpp uses token_embd.weight as the output head too "
        "(a second copy on the GPU when the output is offloaded)",
    )
    token_embd_bytes: int = Field(0, description="bytes of token_embd.weight (counted in input_bytes)")
    context_length: int | None = None
    block_count: int
    embedding_length: int
    feed_forward_length: int | None = None
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    vocab_size: int
    sliding_window: int | None = None
    chat_template: str | None = None
    data_offset: int
    metadata: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="scalar metadata; arrays summarised as '[array of N type]'"
    )
