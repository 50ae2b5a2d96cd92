"""What CPU this is, in the terms that decide int8 and bf16 speed and exactness.

Benchmark figures from different machines are only comparable when their headers say which
integer and bfloat16 instructions the CPU has: with AVX-512 VNNI or AVX-VNNI an int8 dot product
accumulates straight into int32; without it (plain AVX2 or AVX-512) onnxruntime's u8 x s8 kernels
add pairs of products in saturating 16-bit lanes, and AMX multiplies whole int8 / bf16 tiles.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

INSTRUCTION_SETS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}
"""/proc/cpuinfo flags that matter for int8 / bf16 kernels, and their usual names."""
INT32_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU model name and its flags (Linux); elsewhere the platform's name and no flags."""
    path = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's lines
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = frozenset(fields.get("flags", "").split())
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def instruction_sets() -> list[str]:
    """The int8 / bf16 relevant instruction sets this CPU has, by their usual names."""
    flags = _cpuinfo()[1]
    return [name for flag, name in INSTRUCTION_SETS.items() if flag in flags]


def int8_dot_products_exact() -> bool:
    """True where onnxruntime's u8 x s8 kernels accumulate in int32 (VNNI or AMX). False where
    they may saturate a 16-bit pair sum (plain AVX2 / AVX-512), or where the flags are unknown."""
    return any(flag in _cpuinfo()[1] for flag in INT32_DOT_PRODUCT_FLAGS)


def machine() -> str:
    """One line for result headers: CPU model, its int8/bf16 instruction sets, torch threads."""
    found = instruction_sets()
    missing = [name for name in ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8") if name not in found]
    sets = ", ".join(found) or "no AVX2"
    if missing:
        sets += "; no " + ", no ".join(missing)
    return f"{cpu_model()} ({sets}), {torch.get_num_threads()} torch threads available"
