"""Code parity: the integer codes of every quantized activation, in PyTorch and in the runtime.

Agreement of predictions can hide differences that a near-tie would turn into a flipped label
elsewhere; comparing the codes themselves shows what the integer kernels really compute.

What is exact and what is bounded. With power-of-two scales every operation is exact and the codes
are equal bit for bit. With trained scales the fake-quantized model sums products of float values
in float32, while the int8 kernel sums integers exactly and rescales once; near a rounding tie
the two can land one code apart. Such a difference then travels downstream (the next layer reads
it), so the figures are: the share of all codes that differ (`code_mismatch_rate`, %), the
largest difference anywhere, and the largest difference in the first tensor (in execution order)
where any differs: that one comes from rounding alone and is at most one step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qatkd.export.frozen import act_range, tensor_hint
from qatkd.export.onnx_export import ACTIVATION_CODES, INPUT_NAME, OUTPUT_NAME
from qatkd.export.runtime import ort_session
from qatkd.quant import QuantAct, Quantizer, QuantSiLU
from qatkd.quant.tensors import QUANTIZED_INPUT


def activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Quantized tensor's hint -> the PyTorch quantizer that makes its codes, for every tensor
    that the exported graph quantizes (float inputs left out)."""
    found = {}
    for name, m in model.named_modules():
        uses = []
        if isinstance(m, QUANTIZED_INPUT):
            uses.append((f"{name}.input", m.input_quantizer))
        if isinstance(m, QuantSiLU):
            uses.append((f"{name}.gate", m.gate_quantizer))
        if isinstance(m, QuantAct):
            uses.append((name, m.quantizer))
        for hint, quantizer in uses:
            if act_range(quantizer, hint) is not None:
                found.setdefault(tensor_hint(quantizer, hint), quantizer)
    return found


@torch.no_grad()
def pytorch_codes(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The integer codes of every quantized tensor of `model` (eval mode) on `x`, in execution
    order, keyed by the tensor's hint, and the output under `OUTPUT_NAME`. A quantizer that
    serves several tensors (a concatenation's inputs) gives the first one's, as the graph's
    metadata names it."""
    codes: dict[str, np.ndarray] = {}
    hooks = []
    for key, quantizer in activation_quantizers(model).items():

        def hook(m: nn.Module, inp: Any, out: torch.Tensor, key: str = key) -> None:
            codes.setdefault(key, torch.round(out / m.scale).numpy())

        hooks.append(quantizer.register_forward_hook(hook))
    try:
        codes[OUTPUT_NAME] = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return codes


def activation_codes(proto: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Each quantized tensor's hint -> (the graph tensor holding its codes, their zero point),
    from the graph's metadata."""
    for entry in proto.metadata_props:
        if entry.key == ACTIVATION_CODES:
            return {hint: tuple(value) for hint, value in json.loads(entry.value).items()}
    return {}


def code_runner(
    proto: onnx.ModelProto, names: Iterable[str], optimize: bool = True
) -> Callable[[torch.Tensor], dict[str, np.ndarray]]:
    """A function from an input batch to the codes of the quantized tensors `names` (hints, as
    `pytorch_codes` keys them; `OUTPUT_NAME` for the output) as onnxruntime computes them (int8
    kernels, or with `optimize=False` the QDQ graph in float), made graph outputs of a copy of
    `proto`."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    tensors = {OUTPUT_NAME: (OUTPUT_NAME, 0)} | activation_codes(proto)
    for name in names:
        if name != OUTPUT_NAME:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensors[name][0]))
    session = ort_session(proto.SerializeToString(), threads=1, optimize=optimize)
    hints = {tensor: hint for hint, (tensor, _) in tensors.items()}
    outputs = [hints[o.name] for o in session.get_outputs()]

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        values = session.run(None, {INPUT_NAME: x.numpy()})
        return {
            hint: value if hint == OUTPUT_NAME else value.astype(np.int32) - tensors[hint][1]
            for hint, value in zip(outputs, values, strict=True)
        }

    return run


class CodeMismatch:
    """Running counts of differing codes over batches (see the module doc for the figures)."""

    def __init__(self) -> None:
        self.total = self.differ = 0
        self.max_diff = self.first_max_diff = 0.0
        self.first_tensor: str | None = None

    def add(self, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> np.ndarray:
        """Compare one batch; returns which samples have every code equal."""
        exact = np.ones(len(expected[OUTPUT_NAME]), dtype=bool)
        first_here = True
        for name, codes in expected.items():
            if name == OUTPUT_NAME:
                continue
            diff = np.abs(got[name].astype(np.float64) - codes)
            differ = int((diff > 0).sum())
            self.total += diff.size
            self.differ += differ
            if differ:
                self.max_diff = max(self.max_diff, float(diff.max()))
                exact &= ~(diff > 0).reshape(len(exact), -1).any(1)
                if first_here:
                    self.first_max_diff = max(self.first_max_diff, float(diff.max()))
                    self.first_tensor = self.first_tensor or name
                    first_here = False
        return exact

    def figures(self) -> dict[str, Any]:
        return {
            "codes_compared": self.total,
            "code_mismatch_rate": 100.0 * self.differ / max(self.total, 1),
            "code_max_diff": self.max_diff,
            "code_first_mismatch": self.first_tensor,
            "code_first_mismatch_max_diff": self.first_max_diff,
        }


def code_parity(
    model: nn.Module, proto: onnx.ModelProto, batches: Iterable[torch.Tensor]
) -> dict[str, Any]:
    """The code-mismatch figures of onnxruntime's int8 kernels against `model` (eval mode, the
    aligned model the graph was written from) on input `batches`."""
    mismatch = CodeMismatch()
    run = None
    for x in batches:
        expected = pytorch_codes(model, x)
        run = run or code_runner(proto, expected)
        mismatch.add(expected, run(x))
    return mismatch.figures()
