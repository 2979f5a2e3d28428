"""The formats the interop modules read and write, as names only (the command line builds its choices from
these without importing torch)."""

WEIGHT_DTYPES = ("bf16", "fp16", "fp32")
"""Dtypes a checkpoint's weights are written in."""
EXPORT_FORMATS = ("llama", "minicpm", "gguf", "mixtral")
"""llama: plain LlamaForCausalLM with μP folded in; mixtral: an MoE model as MixtralForCausalLM, μP folded in; minicpm: the official MiniCPM layout (another dtype, sharded);
gguf: one file for llama.cpp (interop/gguf.py)."""
GGUF_ARCHES = ("minicpm", "llama")
"""llama.cpp architectures: MiniCPM with its μP scales as metadata, or the folded plain Llama."""
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
"""GGUF tensor types written."""
