"""llama.cpp's own quantizations of a GGUF model (`Q4_0`, `Q4_K_M`, `Q3_K_M`, `Q2_K`: what a CPU
user runs instead of qatkd), made by llama.cpp's quantize API, `llama_model_quantize`.

The prebuilt `xllamacpp` library that `_llamacpp.py` scores with does not export that function;
`llama-cpp-python` (the `llamacpp` extra; it builds llama.cpp from its source distribution, about
3 minutes on 2 cores) does. Each file is made in a child process, so that the two builds of
llama.cpp never share one process. From the teacher's Q4_1 GGUF the quantizer dequantizes each
tensor and quantizes it again (`allow_requantize`): the same float weights the FP teacher has.
Where a tensor's rows do not fill k-quant super-blocks of 256 (SmolLM2's 576 inputs), llama.cpp
picks a fallback type itself, so compare the files by size, not by name.

    python benchmarks/_llamacpp_quantize.py IN.gguf OUT.gguf TYPE
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
"""The quantizations of the page, as llama.cpp names them (`LLAMA_FTYPE_MOSTLY_<TYPE>`)."""
PACKAGE = "llama-cpp-python"


def version() -> str | None:
    """The installed llama-cpp-python (its llama.cpp makes the files), or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return importlib.metadata.version(PACKAGE)


def quantized(source: Path, kind: str, out: Path) -> Path:
    """`out`, llama.cpp's `kind` quantization of `source`, made unless there already (its name
    must say what it depends on: the caller's key)."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        command = [sys.executable, __file__, str(source), str(partial), kind]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"llama.cpp could not make {kind} of {source}: {done.stderr[-500:]}")
        partial.replace(out)
    return out


def main() -> None:
    import llama_cpp

    source, out, kind = sys.argv[1:]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status}")


if __name__ == "__main__":
    main()
