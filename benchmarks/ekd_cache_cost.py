"""The cost of distilling from an ensemble: one epoch of EKD with 3 teachers, with and without the
teacher-logit cache, as a ratio to one epoch of KD from a single teacher, measured in one run.

    python benchmarks/ekd_cache_cost.py --teachers T1.pt T2.pt T3.pt --student S.pt [--limit N]

The student is a W4A4 ResNet-8 started from the FP32 checkpoint `--student`; the data are the first
`--limit` Fashion-MNIST training images without augmentation (the cache needs fixed inputs). The
cached run reads logits written by a warm-up run, so it times the steady state of later epochs.
Writes benchmarks/results/ekd_cache_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _provenance import command, git_commit, machine, markdown_header

from qatkd import pipeline
from qatkd.config import load_config

RESULTS = Path(__file__).parent / "results"


def epoch_seconds(work: Path, name: str, overrides: list[str]) -> float:
    start = time.perf_counter()
    pipeline.distill(load_config(overrides=[*overrides, f"out={work / name}"]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs=3, required=True, type=Path)
    parser.add_argument("--student", required=True, type=Path, help="FP32 ResNet-8 checkpoint")
    parser.add_argument("--limit", type=int, default=6000, help="training images (6000)")
    args = parser.parse_args()
    commit = git_commit()  # now: the tree may change while the run goes on
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = [
            "model.name=resnet8",
            f"model.init={args.student}",
            "quant.bits=W4A4",
            "data.augment=false",
            f"data.train_limit={args.limit}",
            "data.test_limit=500",
            "train.epochs=1",
            f"kd.cache_dir={work / 'cache'}",
        ]
        one = f"teachers=[{args.teachers[0]}]"
        three = "teachers=[" + ",".join(map(str, args.teachers)) + "]"
        epoch_seconds(work, "warmup", [*common, three, "kd.cache=true"])  # writes the cache
        seconds = {
            "kd_1_teacher": epoch_seconds(work, "kd", [*common, one]),
            "ekd_3_teachers": epoch_seconds(work, "ekd", [*common, three]),
            "ekd_3_teachers_cached": epoch_seconds(
                work, "ekd_cached", [*common, three, "kd.cache=true"]
            ),
        }
    ratios = {k: round(v / seconds["kd_1_teacher"], 3) for k, v in seconds.items()}
    result = {
        "commit": commit,
        "command": command(),
        "machine": machine(),
        "wall_s": round(time.time() - started, 1),
        "train_images": args.limit,
        "seconds": seconds,
        "ratio_to_single_teacher_kd": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ekd_cache_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {seconds[k]:.1f} | {ratios[k]:.2f}x |" for k in seconds)
    (RESULTS / "ekd_cache_cost.md").write_text(
        markdown_header(
            "Cost of one EKD epoch: 3 teachers, cached vs live",
            result,
            f"{args.limit} training images, W4A4 ResNet-8 student, one epoch each (with the "
            "end-of-epoch evaluation on 500 test images)",
        )
        + f"| run | seconds | ratio to single-teacher KD |\n|---|---:|---:|\n{rows}\n"
    )
    print((RESULTS / "ekd_cache_cost.md").read_text())


if __name__ == "__main__":
    main()
