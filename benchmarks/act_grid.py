"""Where a W8A8 min-max PTQ loses an architecture's accuracy, and whether activation grids with a
zero point would keep it: arch_speed's fine-tuned model (its full schedule and cache) quantized
weights only, activations only and both, then with each activation quantizer replaced by a grid
over its own calibration [min, max] with an integer zero point (onnxruntime's u8 activations;
qatkd's own activation grids are symmetric).

    python benchmarks/act_grid.py [--arch efficientnet_b0] [--work DIR]

Top-1 on the first 1,000 Fashion-MNIST test images at 224 x 224 and agreement with the float
model; calibration on arch_speed's 128 training images. Writes
benchmarks/results/act_grid.{md,json}.
About 12 min for EfficientNet-B0 on 2 cores (its fine-tuning included, when not cached).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from _arch_models import fashion_images, fine_tuned
from _peers import ort_quantize_static
from _provenance import command, default_work, git_commit, machine
from arch_speed import FULL, NAME
from torch import Tensor, nn

from qatkd.export import INPUT_NAME, to_onnx
from qatkd.export.runtime import ort_session
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.quant.base import Quantizer

RESULTS = Path(__file__).parent / "results"
TEST_IMAGES = 1000
CALIBRATION_BATCH = 32


def activation_quantizers(model: nn.Module) -> list[Quantizer]:
    """The model's activation quantizers, each once (a shared one has several names)."""
    found = {id(m): m for m in model.modules() if isinstance(m, Quantizer) and not m.is_weight}
    return list(found.values())


def ranges(model: nn.Module, batches: list[Tensor]) -> dict[int, tuple[float, float]]:
    """Each activation quantizer's input [min, max] over `batches`, the model in eval mode."""
    seen: dict[int, tuple[float, float]] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        low, high = seen.get(id(module), (0.0, 0.0))  # 0 stays on the grid
        seen[id(module)] = (min(low, float(args[0].min())), max(high, float(args[0].max())))

    handles = [q.register_forward_pre_hook(record) for q in activation_quantizers(model)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return seen


def with_zero_point_grids(model: nn.Module, batches: list[Tensor]) -> None:
    """Make each activation quantizer of `model` compute a grid of 2^bits codes over its input's
    calibration [min, max] with an integer zero point instead of its own (forward hooks that
    replace its output)."""
    bounds = ranges(model, batches)

    def quantize(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        low, high = bounds[id(module)]
        levels = 2**module.bits - 1
        step = max(high - low, 1e-8) / levels
        zero = round(-low / step)
        return (torch.clamp(torch.round(args[0] / step) + zero, 0, levels) - zero) * step

    for quantizer in activation_quantizers(model):
        quantizer.register_forward_hook(quantize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--work", type=Path, default=default_work(NAME, False))
    args = parser.parse_args()
    torch.set_num_threads(FULL.threads)
    train, test = fashion_images(FULL.fine_tuning.size)
    model, _ = fine_tuned(args.arch, train, FULL.fine_tuning, args.work)
    labels = test.labels[:TEST_IMAGES].numpy()
    images = [test(index) for index in test.batches(TEST_IMAGES, 50)]
    count = FULL.calibration_images
    batches = [
        train(slice(i, min(i + CALIBRATION_BATCH, count)))
        for i in range(0, count, CALIBRATION_BATCH)
    ]

    def logits(m: nn.Module) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([m(x) for x in images]).numpy()

    reference = logits(model)
    rows: dict[str, dict[str, float]] = {}

    def score(name: str, out: np.ndarray) -> None:
        rows[name] = {
            "top1": round(100 * float((out.argmax(1) == labels).mean()), 2),
            "agreement": round(100 * float((out.argmax(1) == reference.argmax(1)).mean()), 2),
        }
        print(f"{name}: {rows[name]}", flush=True)

    def ptq(bits: str) -> nn.Module:
        config = QuantConfig(bits=bits, method="minmax", first_last_bits=None)
        quantized = prepare(copy.deepcopy(model), config)
        calibrate(quantized, batches, count)
        return quantized.eval()

    score("float", reference)
    for bits, name in (("W8A16", "weights only"), ("W16A8", "activations only")):
        score(f"{name}, qatkd's grids", logits(ptq(bits)))
    w8a8 = ptq("W8A8")
    score("W8A8, qatkd's grids", logits(w8a8))
    with_zero_point_grids(w8a8, batches)
    score("W8A8, activations on zero-point grids", logits(w8a8))
    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = Path(tmp) / "model.fp32.onnx"
        size = FULL.fine_tuning.size
        onnx.save(to_onnx(model, [3, size, size], "fp32"), str(fp32_onnx))
        peer = ort_quantize_static(fp32_onnx, Path(tmp) / "peer.onnx", train.one_per_batch(count))
        session = ort_session(str(peer), FULL.threads)
        score(
            "W8A8, onnxruntime quantize_static (u8 activations with zero points)",
            np.concatenate([session.run(None, {INPUT_NAME: x.numpy()})[0] for x in images]),
        )
    result = {
        "commit": git_commit(),
        "command": command(),
        "machine": machine(),
        "architecture": args.arch,
        "test_images": TEST_IMAGES,
        "calibration_images": count,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "act_grid.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(f"| {k} | {v['top1']:.2f} | {v['agreement']:.2f} |" for k, v in rows.items())
    (RESULTS / "act_grid.md").write_text(
        f"# {args.arch}: where W8A8 min-max PTQ loses accuracy, and a grid with a zero point\n\n"
        f"- commit: {result['commit']}\n- command: `{result['command']}`\n"
        f"- machine: {result['machine']}\n"
        f"- arch_speed's fine-tuned model and calibration ({count} training images); top-1 on "
        f"the first {TEST_IMAGES} test images at 224 x 224\n\n"
        "qatkd's activation grids are symmetric (codes -128..127 at abs-max / 127 for a signed "
        "tensor); the zero-point row replaces each with 256 codes over the tensor's calibration "
        "[min, max] and an integer zero point, as onnxruntime's u8 activations; the last row is "
        "onnxruntime's `quantize_static` of the float model (QDQ, u8 activations, per-channel s8 "
        "weights, min-max on the same calibration images), run in onnxruntime.\n\n"
        f"| model | top-1 % | agreement with float % |\n|---|---:|---:|\n{table}\n"
    )
    print((RESULTS / "act_grid.md").read_text())


if __name__ == "__main__":
    main()
