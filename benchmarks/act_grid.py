"""Where a W8A8 min-max PTQ loses an architecture's accuracy, and what activation grids with a
zero point (`quant.act_grid`) give back: arch_speed's fine-tuned model (its full schedule and
cache) quantized weights only, activations only and both, on symmetric grids and on grids with a
zero point (qatkd's default at 8 bits), the latter also exported and run in onnxruntime, beside
onnxruntime's own `quantize_static` of the same float model on the same calibration images.

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
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from _arch_models import fashion_images, fine_tuned
from _peers import ort_quantize_static
from _provenance import command, default_work, git_commit, machine, markdown_header
from arch_speed import FULL, NAME
from torch import nn

from qatkd.export import INPUT_NAME, as_exported, to_onnx
from qatkd.export.runtime import ort_session
from qatkd.quant import QuantConfig, calibrate, prepare

RESULTS = Path(__file__).parent / "results"
TEST_IMAGES = 1000
CALIBRATION_BATCH = 32
GRIDS = {"symmetric": "symmetric grids", "zero_point": "grids with a zero point"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--work", type=Path, default=default_work(NAME, False))
    args = parser.parse_args()
    commit = git_commit()  # now: the tree may change while the run goes on
    started = time.time()
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

    def ptq(bits: str, act_grid: str) -> nn.Module:
        config = QuantConfig(bits=bits, method="minmax", first_last_bits=None, act_grid=act_grid)
        quantized = prepare(copy.deepcopy(model), config)
        calibrate(quantized, batches, count)
        return quantized.eval()

    size = FULL.fine_tuning.size
    score("float", reference)
    score("weights only", logits(ptq("W8A16", "symmetric")))
    for grid, name in GRIDS.items():
        score(f"activations only, {name}", logits(ptq("W16A8", grid)))
    w8a8 = {grid: ptq("W8A8", grid) for grid in GRIDS}
    for grid, name in GRIDS.items():
        score(f"W8A8, {name}", logits(w8a8[grid]))
    exported = as_exported(w8a8["zero_point"], [3, size, size])
    computed = logits(exported)
    score("W8A8, grids with a zero point, PyTorch (the model the graph computes)", computed)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = Path(tmp) / "model.fp32.onnx"
        onnx.save(to_onnx(model, [3, size, size], "fp32"), str(fp32_onnx))
        runs = {
            "W8A8, grids with a zero point, qatkd's int8 graph in onnxruntime": to_onnx(
                exported, [3, size, size], "int8"
            ).SerializeToString(),
            "W8A8, onnxruntime quantize_static (u8 activations with zero points)": str(
                ort_quantize_static(fp32_onnx, Path(tmp) / "peer.onnx", train.one_per_batch(count))
            ),
        }
        outputs = {}
        for name, graph in runs.items():
            session = ort_session(graph, FULL.threads)
            outputs[name] = np.concatenate(
                [session.run(None, {INPUT_NAME: x.numpy()})[0] for x in images]
            )
            score(name, outputs[name])
    in_onnxruntime = next(iter(outputs.values()))
    parity = round(100 * float((in_onnxruntime.argmax(1) == computed.argmax(1)).mean()), 2)
    result = {
        "commit": commit,
        "command": command(),
        "machine": machine(),
        "wall_s": round(time.time() - started, 1),
        "architecture": args.arch,
        "test_images": TEST_IMAGES,
        "calibration_images": count,
        "rows": rows,
        "parity_top1_agreement": parity,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "act_grid.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(f"| {k} | {v['top1']:.2f} | {v['agreement']:.2f} |" for k, v in rows.items())
    (RESULTS / "act_grid.md").write_text(
        markdown_header(
            f"{args.arch}: where W8A8 min-max PTQ loses accuracy, and a grid with a zero point",
            result,
            f"arch_speed's fine-tuned model and calibration ({count} training images); top-1 on "
            f"the first {TEST_IMAGES} test images at {size} x {size}",
        )
        + "qatkd's min-max PTQ (`quant.method=minmax`, 8-bit first and last layers like the rest) "
        "on symmetric activation grids (`quant.act_grid=symmetric`: codes -128..127 at abs-max "
        "/ 127 for a signed tensor) and on grids with a zero point (`quant.act_grid=zero_point`, "
        "the default at 8 bits: 256 codes over the tensor's calibration [min, max], an even zero "
        "code), the latter also as the int8 graph `qatkd export` writes, run in onnxruntime; the "
        "last row is onnxruntime's `quantize_static` of the float model (QDQ, u8 activations, "
        "per-channel s8 weights, min-max on the same calibration images), run in onnxruntime."
        "\n\n"
        f"| model | top-1 % | agreement with float % |\n|---|---:|---:|\n{table}\n\n"
        f"qatkd's int8 graph in onnxruntime agrees with the PyTorch model it computes on "
        f"{parity:.2f} % of the images' top-1.\n"
    )
    print((RESULTS / "act_grid.md").read_text())


if __name__ == "__main__":
    main()
