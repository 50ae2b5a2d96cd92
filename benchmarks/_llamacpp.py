"""llama.cpp itself, from a prebuilt wheel, for the GGUF benchmark: logits of token ids (scored by
qatkd's own LanguageTask, so the windows and the formula are qatkd's) and greedy-decoding speed.

llama.cpp is not compiled here (a source build takes over an hour on 2 cores): the `llamacpp`
extra's `xllamacpp` wheel (Xorbits, MIT) links llama.cpp and ggml into one library that exports
llama.cpp's whole C API, which ctypes calls directly (xllamacpp's own Python API is a server with
no per-token logits). Two parameter structs change between llama.cpp versions, so they are never
declared field by field: their defaults are fetched into a larger buffer and handed back with
only the leading fields set (context size, batch sizes, threads), after checking that those
defaults read as expected; a layout change is refused, not misread. Hence the pinned version.
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

XLLAMACPP = "xllamacpp==2026.10.11549"
"""The wheel whose struct layouts `Llama` was checked against."""


class _Params(C.Structure):
    """Room for llama_model_params / llama_context_params (each well under 512 bytes): returned
    through a hidden pointer and passed in memory on x86-64, so the spare bytes are harmless."""

    _fields_ = [("raw", C.c_uint64 * 64)]


class _Batch(C.Structure):
    """llama_batch, unchanged for years."""

    _fields_ = [
        ("n_tokens", C.c_int32),
        ("token", C.POINTER(C.c_int32)),
        ("embd", C.POINTER(C.c_float)),
        ("pos", C.POINTER(C.c_int32)),
        ("n_seq_id", C.POINTER(C.c_int32)),
        ("seq_id", C.POINTER(C.POINTER(C.c_int32))),
        ("logits", C.POINTER(C.c_int8)),
    ]


_LOG = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)
_QUIET = _LOG(lambda level, text, user: None)  # module-level: must outlive the library
_SIGNATURES = {
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [_LOG, C.c_void_p]),
    "llama_model_default_params": (_Params, []),
    "llama_context_default_params": (_Params, []),
    "llama_model_load_from_file": (C.c_void_p, [C.c_char_p, _Params]),
    "llama_init_from_model": (C.c_void_p, [C.c_void_p, _Params]),
    "llama_model_free": (None, [C.c_void_p]),
    "llama_free": (None, [C.c_void_p]),
    "llama_model_get_vocab": (C.c_void_p, [C.c_void_p]),
    "llama_vocab_n_tokens": (C.c_int32, [C.c_void_p]),
    "llama_set_n_threads": (None, [C.c_void_p, C.c_int32, C.c_int32]),
    "llama_get_memory": (C.c_void_p, [C.c_void_p]),
    "llama_memory_clear": (None, [C.c_void_p, C.c_bool]),
    "llama_batch_init": (_Batch, [C.c_int32, C.c_int32, C.c_int32]),
    "llama_batch_free": (None, [_Batch]),
    "llama_decode": (C.c_int32, [C.c_void_p, _Batch]),
    "llama_get_logits_ith": (C.POINTER(C.c_float), [C.c_void_p, C.c_int32]),
}


def library_path() -> Path | None:
    """xllamacpp's library, or None when the `llamacpp` extra is not installed."""
    if importlib.util.find_spec("xllamacpp") is None:  # a submodule's find_spec would raise
        return None
    spec = importlib.util.find_spec("xllamacpp.xllamacpp")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _library() -> C.CDLL:
    path = library_path()
    if path is None:
        raise SystemExit(f"llama.cpp is missing: pip install --only-binary=:all: {XLLAMACPP}")
    lib = C.CDLL(str(path))
    for name, (result, args) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, args
    lib.llama_log_set(_QUIET, None)
    lib.llama_backend_init()
    return lib


class Llama:
    """A GGUF model in llama.cpp with one sequence of up to `context` tokens, on `threads`."""

    def __init__(self, gguf: Path, context: int, threads: int) -> None:
        self.lib = lib = _library()
        self.model = lib.llama_model_load_from_file(
            os.fsencode(gguf), lib.llama_model_default_params()
        )
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        params = lib.llama_context_default_params()
        head = (C.c_uint32 * 9).from_buffer(params)  # n_ctx, n_batch, n_ubatch, ..., n_threads x2
        if list(head[1:4]) != [2048, 512, 1] or head[7] != head[8]:
            raise SystemExit(f"llama_context_params of this llama.cpp is not {XLLAMACPP}'s")
        head[0] = head[1] = head[2] = context  # one window is one batch
        head[7] = head[8] = threads
        self.context = lib.llama_init_from_model(self.model, params)
        if not self.context:
            raise SystemExit(f"llama.cpp could not make a context for {gguf}")
        lib.llama_set_n_threads(self.context, threads, threads)
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(context, 0, 1)
        self.size = context

    def logits(self, ids: list[int], start: int, outputs: list[int]) -> np.ndarray:
        """Decode `ids` at positions start..; the logits [len(outputs), vocab] at `outputs`."""
        if len(ids) > self.size:
            raise ValueError(f"{len(ids)} tokens do not fit a context of {self.size}")
        batch, wanted = self.batch, set(outputs)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i in wanted
        batch.n_tokens = len(ids)
        if self.lib.llama_decode(self.context, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [self.lib.llama_get_logits_ith(self.context, i) for i in outputs]
        return np.stack([np.ctypeslib.as_array(r, shape=(self.vocab_size,)) for r in rows])

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.context)
        self.lib.llama_model_free(self.model)


class LlamaCppLogits(nn.Module):
    """Token ids [B, T] -> llama.cpp's logits [B, T, V] (each row a fresh sequence): a model
    that qatkd's LanguageTask scores like any other."""

    def __init__(self, llama: Llama) -> None:
        super().__init__()
        self.llama = llama

    def forward(self, ids: Tensor) -> Tensor:
        rows = []
        for row in ids.tolist():
            self.llama.clear()
            rows.append(torch.from_numpy(self.llama.logits(row, 0, list(range(len(row))))))
        return torch.stack(rows)


def greedy_speed(llama: Llama, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """Prefill and decode tokens/s of greedy generation: the prompt in one batch, then one
    token at a time."""
    llama.clear()
    began = time.perf_counter()
    logits = llama.logits(prompt, 0, [len(prompt) - 1])
    prefill = time.perf_counter() - began
    began = time.perf_counter()
    for step in range(new_tokens):
        logits = llama.logits([int(logits[0].argmax())], len(prompt) + step, [0])
    decode = time.perf_counter() - began
    return {"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": new_tokens / decode}
