"""The peers' wrappers (benchmarks/_peers.py): which failures of onnxruntime's pre-processing are
retried without its symbolic shape inference."""

from __future__ import annotations

import pytest
from _peers import _in_symbolic_shape_inference


def _raised_in(filename: str, source: str) -> Exception:
    with pytest.raises(Exception) as info:
        exec(compile(source, filename, "exec"))
    return info.value


def test_a_failure_inside_symbolic_shape_inference_is_retried_whatever_its_message():
    """ViT-B/16: a bare AssertionError from inside the inference, with no message to match."""
    inside = "onnxruntime/tools/symbolic_shape_infer.py"
    assert _in_symbolic_shape_inference(_raised_in(inside, "assert False"))
    message = "Incomplete symbolic shape inference"
    assert _in_symbolic_shape_inference(_raised_in("quantize.py", f"raise Exception({message!r})"))


def test_any_other_failure_is_not():
    assert not _in_symbolic_shape_inference(_raised_in("quantize.py", "assert False"))
    assert not _in_symbolic_shape_inference(_raised_in("quantize.py", "raise ValueError('shape')"))
