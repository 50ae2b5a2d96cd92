"""Int8 speed per architecture beside the peers: for each torchvision classification
architecture, does qatkd's int8 export work, agree with PyTorch, and run as fast as the
runtimes' own quantizers and faster than FP32?

Each architecture (10 classes, 3 x 224 x 224) is fine-tuned briefly in float on Fashion-MNIST
resized to its input (`_arch_models`), then quantized by qatkd (`prepare(W8A8, minmax)`,
calibrated on training images, exported int8) and by onnxruntime's `quantize_static` and
`nncf.quantize` from the same float model and calibration images (`_peers`), and measured
(`_arch_bench`): top-1 agreement on test images in onnxruntime and OpenVINO, b1 and b64 latency
of every int8 graph and of FP32, round-robin in one process per architecture. Each
architecture's result is cached in the work folder under a key of everything it depends on
(not the machine: each result names its own), so an interrupted run continues where it
stopped, and the page is rewritten after each architecture; a run also reuses the committed
page's results under its key, so a later session, on another machine, finishes the page.
Writes benchmarks/results/arch_speed[_quick].{md,json,png}.

    make peers
    python benchmarks/arch_speed.py [--quick] [--arch NAME ...] [--work DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from _arch_bench import (
    LATENCY_BATCHES,
    Schedule,
    cached,
    measure_and_cache,
)
from _arch_models import ARCHITECTURES, FineTuning, fashion_images
from _figures import plt, save_figure
from _float_blocks import ALL_INT8, MIXED, SELECTION_REPEATS
from _parity import NOISE
from _peers import NNCF_PEER, ORT_PEER
from _provenance import command, default_work, git_commit, markdown_header, result_stem
from _speed import MET, latency, meets

from qatkd.export.bench import add_speedups, speed_table
from qatkd.export.run import FP32_REFERENCE
from qatkd.machine import machine

RESULTS = Path(__file__).parent / "results"
NAME = "arch_speed"
QUICK_ARCHITECTURES = ("mobilenet_v3_small", "efficientnet_b0", "resnet18")
"""A squeeze-excite network with Hardswish, one with SiLU, and a plain residual one."""
FULL = Schedule(FineTuning(224, 40, 32, 512), 128, 1000, (50, 10), threads=2)
QUICK = Schedule(FineTuning(64, 30, 32, 256), 32, 256, (20, 5), threads=2)
PARITY_GOAL = ">= 99.9"
PEER_GOAL = "<= 1.05"
FP32_GOALS = {1: ">= 1.0", 64: ">= 1.5"}
RUNTIMES = {"onnxruntime": ORT_PEER, "openvino": NNCF_PEER}
"""Each runtime and the peer that quantizes for it."""
INT8_GRAPHS = {
    f"{who} {runtime}": (runtime, precision)
    for runtime, peer in RUNTIMES.items()
    for who, precision in (
        ("qatkd", "int8"),
        ("qatkd mixed", MIXED),
        (peer.removeprefix("int8 "), peer),
    )
}
"""The int8 graphs timed, by label: (runtime, precision of their records)."""


def main() -> None:
    args = _arguments()
    schedule = dataclasses.replace(QUICK if args.quick else FULL, threads=args.threads)
    if args.repeats:
        schedule = dataclasses.replace(schedule, repeats=(args.repeats,) * len(LATENCY_BATCHES))
    torch.set_num_threads(args.threads)
    run = {"commit": git_commit(), "started": time.time()}  # the commit before pages are written
    work = args.work or default_work(NAME, args.quick)
    mode = QUICK_ARCHITECTURES if args.quick else ARCHITECTURES
    selected = args.arch or mode
    page = committed_results(args.quick)
    wanted = [a for a in ARCHITECTURES if a in selected or a in mode]
    results = {
        a: cached(a, schedule, work, page) for a in ARCHITECTURES if a in wanted or a in page
    }
    # the page keeps what it showed that still holds (an architecture measured with --arch)
    results = {a: r for a, r in results.items() if a in wanted or r is not None}
    for name, result in results.items():
        if result is not None:
            print(f"{name}: reused, measured at commit {result['commit']} on {result['machine']}")
    run["reused"] = sum(r is not None for r in results.values())
    train, test = fashion_images(schedule.fine_tuning.size)
    for name in list(results):
        if results[name] is None and name in selected:
            print(f"{name}: measuring", flush=True)
            results[name] = measure_and_cache(name, schedule, train, test, work, run["commit"])
            write_results(args.quick, schedule, results, run)  # a killed run leaves a page
    write_results(args.quick, schedule, results, run)


def committed_results(quick: bool) -> dict[str, Result]:
    """The results by architecture on the committed page (empty where there is none): a run
    reuses those measured under its key, so that the page can be finished in another session,
    on another machine."""
    path = RESULTS / f"{result_stem(NAME, quick)}.json"
    return json.loads(path.read_text())["architectures"] if path.is_file() else {}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--quick", action="store_true", help=f"{', '.join(QUICK_ARCHITECTURES)} at 64 x 64"
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        choices=ARCHITECTURES,
        help="measure these only (the page shows the mode's other architectures where an "
        "earlier run measured them)",
    )
    parser.add_argument("--work", type=Path, help=f"the cache (default runs/bench_{NAME}[_quick])")
    parser.add_argument("--threads", type=int, default=2, help="for every backend")
    parser.add_argument("--repeats", type=int, help="latency rounds at each batch size")
    args = parser.parse_args()
    if importlib.util.find_spec("nncf") is None:
        parser.error("the NNCF peer needs the nncf package: make peers")
    return args


Result = dict[str, Any]


def target_rows(name: str, result: Result) -> list[tuple[str, Any, str, bool]]:
    """(what, measured, target, met) for each of the issue's targets on `name`; measured is None
    where it could not be measured (the export or a peer failed): not met."""
    rows: list[tuple[str, Any, str]] = [("export", result["export"], "ok")]
    parity = result.get("parity", {})
    for runtime in RUNTIMES:
        # the lower of qatkd's int8 graph's and, where one was chosen, its mixed graph's
        ours = [parity.get(f"{runtime} {p}", {}).get("agreement") for p in ("int8", MIXED)]
        agreement = None if ours[0] is None else min(a for a in ours if a is not None)
        rows.append((_agreement_target(runtime), agreement, PARITY_GOAL))
    records = result.get("records", [])
    for runtime, peer in RUNTIMES.items():
        for batch in LATENCY_BATCHES:
            ours = {"backend": runtime, "precision": "int8"}
            ratio = _ratio(records, name, batch, ours, {"backend": runtime, "precision": peer})
            rows.append((f"qatkd / {peer.removeprefix('int8 ')} b{batch}", ratio, PEER_GOAL))
    for batch in LATENCY_BATCHES:
        ours = (
            _ratio(records, name, batch, {"precision": "fp32"}, {"precision": precision})
            for precision in ("int8", MIXED)
        )
        speedup = max((r for r in ours if r is not None), default=None)
        rows.append((f"best FP32 / best qatkd b{batch}", speedup, FP32_GOALS[batch]))
    return [
        (what, value, goal, value == "ok" if goal == "ok" else bool(value and meets(value, goal)))
        for what, value, goal in rows
    ]


def _agreement_target(runtime: str) -> str:
    """The label of `runtime`'s agreement target in `target_rows`."""
    return f"agreement {runtime} (%)"


def _ratio(
    records: list[Result],
    name: str,
    batch: int,
    numerator: dict[str, str],
    denominator: dict[str, str],
) -> float | None:
    """The fastest latency matching `numerator` over the fastest matching `denominator`, or None
    where either is missing."""
    try:
        return latency(records, name, batch, **numerator) / latency(
            records, name, batch, **denominator
        )
    except ValueError:  # no such record
        return None


def speedups(records: list[Result], name: str, batch: int) -> dict[str, float | None]:
    """Each int8 graph's speedup over FP32 in its own runtime."""
    return {
        graph: _ratio(
            records,
            name,
            batch,
            {"backend": runtime, "precision": "fp32"},
            {"backend": runtime, "precision": precision},
        )
        for graph, (runtime, precision) in INT8_GRAPHS.items()
    }


def write_results(
    quick: bool, schedule: Schedule, results: dict[str, Result | None], run: Result
) -> None:
    stem = result_stem(NAME, quick)
    records = [r for result in results.values() for r in (result or {}).get("records", [])]
    add_speedups(records, FP32_REFERENCE)
    measured = {name: r for name, r in results.items() if r is not None}
    targets = {name: target_rows(name, result) for name, result in measured.items()}
    provenance = {
        "commit": run["commit"],
        "command": command(),
        "machine": page_machine(measured),
        "wall_s": round(time.time() - run["started"], 1),
        "runs_reused": run["reused"],
        "train_s": round(sum(r["fine_tune_s"] for r in measured.values()), 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    page = {
        **provenance,
        "schedule": dataclasses.asdict(schedule),
        "architectures": results,
        "targets": [
            {"architecture": name, "what": what, "measured": value, "target": goal, "met": met}
            for name, rows in targets.items()
            for what, value, goal, met in rows
        ],
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(page, indent=2) + "\n")
    plot(results, RESULTS / f"{stem}.png")
    text = markdown(schedule, results, targets, records, provenance, stem)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


def markdown(
    schedule: Schedule,
    results: dict[str, Result | None],
    targets: dict[str, list[tuple[str, Any, str, bool]]],
    records: list[Result],
    provenance: Result,
    stem: str,
) -> str:
    measured = {name: r for name, r in results.items() if r is not None}
    size = schedule.fine_tuning.size
    lines = [
        markdown_header(
            "Int8 speed per architecture beside the peers", provenance, _schedule_text(schedule)
        ).rstrip(),
        "",
        f"Every torchvision architecture below, 10 classes at 3 x {size} x {size}, fine-tuned",
        "briefly in float on Fashion-MNIST resized to its input (no pretrained weights here), so",
        "that its logits tell the images apart; then quantized by qatkd (`prepare(W8A8, minmax)`,",
        "calibrated on training images, exported int8) and by onnxruntime's `quantize_static`",
        "(QDQ, per-channel s8 weights, u8 activations) and `nncf.quantize` (OpenVINO) from the",
        "same float graph (qatkd's FP32 export) and the same calibration images. Agreement: top-1",
        "on the test images, qatkd's int8 graph against its fake-quantized PyTorch model, a peer's",
        "against the float model. Latency: median of rounds after warm-up, every graph of an",
        "architecture round-robin in one process; speed is given as ratios within an",
        "architecture's run.",
        "",
        "## Targets (computed from the rows below)",
        "",
        _targets_table(targets),
        "",
        "## Speedup of each int8 graph over FP32 in the same runtime",
        "",
        _speedup_table(records, measured),
        "",
        f"![speedups]({stem}.png)",
        "",
        "## Export and agreement with PyTorch",
        "",
        _export_table(measured),
        "",
        "Yardsticks of the agreement (`benchmarks/_parity.py`): how often the fake-quantized",
        f"model's own top-1 changes when Gaussian noise of std {NOISE:g} (a quarter of a grey",
        "level) is added to its input, and the mean |logit difference| of qatkd's int8 graph",
        "from that model, in % of the logits' std. Where a graph agrees with the model at least",
        "as often as the model agrees with itself under that noise, and its deviation is a few %",
        "(`make test` holds every family to <= 2 % on trained models), the changed predictions",
        "are near ties that a rounding-sized change flips too; an export error moves every",
        "logit, and the agreement falls below the yardstick.",
        "",
        "OpenVINO's CPU plugin fuses a residual Add into the convolution that computes one of",
        "its operands and drops that operand's rounding on purpose: it computes another graph",
        "than the one exported, closer to float, and no export can change that without losing",
        "the fused kernel. `qatkd.export.openvino_reference` reads which roundings it drops from",
        "its compiled model and writes that graph; the last column compares OpenVINO with it,",
        "run in onnxruntime.",
        "",
        "## Blocks kept in float, chosen by latency",
        "",
        "Where int8 is slower than FP32 (squeeze-excite gates, Hardswish, SiLU), qatkd may",
        "leave those blocks float (`quant.skip`). Each kind alone and all together were",
        f"quantized, exported and timed at b1 ({SELECTION_REPEATS} rounds) in each runtime beside",
        "the all-int8 graph; the fastest is that runtime's `qatkd mixed` graph above where it is",
        "not the all-int8 one (`none`). b1 latency in ms:",
        "",
        *_float_block_lines(measured),
        "",
        "## Agreement misses against the yardstick",
        "",
        *_agreement_lines(measured, targets),
        "",
        "## What runs in float where a target is missed",
        "",
        "The ops that read a DequantizeLinear in the graph onnxruntime optimizes (so run in float",
        "between integer kernels), by type, in qatkd's int8 graph and in `quantize_static`'s.",
        "",
        *_float_ops(measured, targets),
        "",
        "## Every latency",
        "",
        speed_table(records, "onnxruntime FP32"),
        "",
    ]
    missing = [name for name, r in results.items() if r is None]
    if missing:
        lines += [f"Not measured yet: {', '.join(missing)}.", ""]
    commits = sorted({r["commit"] for r in measured.values()})
    if len(commits) > 1:
        lines += [f"Architectures measured at commits {', '.join(commits)} (same sources).", ""]
    return "\n".join(lines + machine_lines(measured))


def machine_lines(measured: dict[str, Result]) -> list[str]:
    """The page's section naming each architecture's machine, where they ran on several."""
    by_machine = _by_machine(measured)
    if len(by_machine) < 2:
        return []
    intro = "Each architecture's figures come from one run on one of:"
    listed = [f"- {m}: {', '.join(names)}" for m, names in by_machine.items()]
    return ["## Machines", "", intro, "", *listed, ""]


def page_machine(measured: dict[str, Result]) -> str:
    """The machine the page's results ran on, or where they ran on several, where to look."""
    by_machine = _by_machine(measured)
    if len(by_machine) > 1:
        return f"{len(by_machine)} machines (each architecture on one: the page's Machines section)"
    return next(iter(by_machine), machine())


def _by_machine(measured: dict[str, Result]) -> dict[str, list[str]]:
    """The architectures measured on each machine, in page order."""
    by_machine: dict[str, list[str]] = {}
    for name, result in measured.items():
        by_machine.setdefault(result["machine"], []).append(name)
    return by_machine


def _schedule_text(schedule: Schedule) -> str:
    tuning = schedule.fine_tuning
    rounds = " / ".join(
        f"{n} at b{b}" for b, n in zip(LATENCY_BATCHES, schedule.repeats, strict=True)
    )
    return (
        f"{tuning.size} x {tuning.size}; fine-tuning: {tuning.steps} AdamW steps of "
        f"{tuning.batch} images, then BatchNorm statistics of {tuning.norm_images}; calibration: "
        f"{schedule.calibration_images} training images; agreement: the first "
        f"{schedule.test_images} test images; latency rounds: {rounds}; threads for every "
        f"backend: {schedule.threads}; a run is one architecture"
    )


def _cell(value: Any, met: bool | None = None) -> str:
    shown = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    return shown if met is None else f"{shown} ({MET[met]})"


def _targets_table(targets: dict[str, list[tuple[str, Any, str, bool]]]) -> str:
    first = next(iter(targets.values()))
    lines = [
        "| architecture | " + " | ".join(f"{what} {goal}" for what, _, goal, _ in first) + " |",
        "|---|" + "---|" * len(first),
    ]
    for name, rows in targets.items():
        cells = [_cell(v, met) for _, v, _, met in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    met = [m for rows in targets.values() for *_, m in rows]
    every = sum(all(m for *_, m in rows) for rows in targets.values())
    lines += [
        "",
        f"Met: {sum(met)} of {len(met)} targets; every target, {every} of {len(targets)} "
        "architectures.",
    ]
    return "\n".join(lines)


def _speedup_table(records: list[Result], measured: dict[str, Result]) -> str:
    columns = [f"b{b}: {graph}" for b in LATENCY_BATCHES for graph in INT8_GRAPHS]
    lines = ["| architecture | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in measured:
        cells = [_cell(v) for b in LATENCY_BATCHES for v in speedups(records, name, b).values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _float_block_lines(measured: dict[str, Result]) -> list[str]:
    lines = []
    for name, r in measured.items():
        selection = r.get("float_blocks") or {}
        for runtime, chosen in selection.items():
            times = ", ".join(f"{label} {ms:.2f}" for label, ms in chosen["b1_ms"].items())
            pick = "all-int8" if chosen["choice"] == ALL_INT8 else chosen["choice"] + " float"
            failed = "".join(
                f"; {k} did not export ({why})" for k, why in chosen["not_exported"].items()
            )
            lines.append(f"- **{name}**, {runtime}: {times}: {pick}{failed}")
    return lines or ["No architecture here has such blocks."]


def _export_table(measured: dict[str, Result]) -> str:
    backends = [f"{runtime} {p}" for p in ("int8", MIXED) for runtime in RUNTIMES]
    backends += [f"{runtime} {peer}" for runtime, peer in RUNTIMES.items()]
    ours = [f"{runtime} int8" for runtime in RUNTIMES]
    lines = [
        "| architecture | qatkd export | float top-1 % | fake-quant top-1 % | "
        + " | ".join(f"agreement {b} %" for b in backends)
        + " | fake-quant with itself, input noise % | "
        + " | ".join(f"logit deviation {b} %" for b in ours)
        + " | agreement openvino int8 with the graph as OpenVINO computes it % | minutes |",
        "|---|---|---:|---:|" + "---:|" * (len(backends) + 2 + len(ours)) + "---:|",
    ]
    for name, r in measured.items():
        accuracy, parity = r["accuracy"], r.get("parity", {})
        cells = [
            r["export"] if r["peers"] == "ok" else f"{r['export']}; peers: {r['peers']}",
            _cell(accuracy["float"]),
            _cell(accuracy.get("qatkd fake-quant")),
            *(_cell(parity.get(b, {}).get("agreement")) for b in backends),
            _cell(r.get("noise_agreement")),
            *(_cell(parity.get(b, {}).get("deviation")) for b in ours),
            _cell(parity.get("openvino int8", {}).get("own_agreement")),
            f"{r['seconds'] / 60:.1f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _agreement_lines(
    measured: dict[str, Result], targets: dict[str, list[tuple[str, Any, str, bool]]]
) -> list[str]:
    """Each missed agreement target beside the noise yardstick, with a verdict."""
    lines = []
    for name, r in measured.items():
        noise = r.get("noise_agreement")
        rows = {what: (value, met) for what, value, _, met in targets[name]}
        for runtime in RUNTIMES:
            value, met = rows[_agreement_target(runtime)]
            if met or value is None or noise is None:
                continue
            graphs = ", ".join(
                f"{precision} {p['agreement']:.2f} % (logit deviation {p['deviation']:.2f} %)"
                for precision in ("int8", MIXED)
                if (p := r["parity"].get(f"{runtime} {precision}"))
            )
            verdict = (
                "within the model's own noise: a quarter grey level flips as many"
                if value >= noise
                else "below the yardstick: more than near ties"
            )
            own = r["parity"].get(f"{runtime} int8", {})
            if "own_agreement" in own:
                verdict += (
                    f"; against the graph as OpenVINO computes it (without the residual roundings"
                    f" it drops) int8 {own['own_agreement']:.2f} % (logit deviation "
                    f"{own['own_deviation']:.2f} %)"
                )
            lines.append(
                f"- **{name}**, {runtime}: {graphs}; the model with itself under noise "
                f"{noise:.2f} %: {verdict}"
            )
    return lines or ["Every agreement target is met."]


def _float_ops(
    measured: dict[str, Result], targets: dict[str, list[tuple[str, Any, str, bool]]]
) -> list[str]:
    lines = []
    for name, r in measured.items():
        missed = [what for what, _, _, met in targets[name] if not met]
        if not missed or r["export"] != "ok":
            continue
        ops = "; ".join(
            f"{graph}: " + (", ".join(f"{op} x{n}" for op, n in counts.items()) or "none")
            for graph, counts in r["float_ops"].items()
        )
        lines.append(f"- **{name}** (missed: {', '.join(missed)}): {ops}")
    return lines or ["Every target is met where the export works."]


def plot(results: dict[str, Result | None], path: Path) -> None:
    """Each int8 graph's speedup over FP32 in its runtime, per architecture, at each batch."""
    measured = {n: r for n, r in results.items() if r is not None and r.get("records")}
    fig, axes = plt.subplots(len(LATENCY_BATCHES), 1, figsize=(12, 7), squeeze=False)
    for ax, batch in zip(axes[:, 0], LATENCY_BATCHES, strict=True):
        width = 0.8 / len(INT8_GRAPHS)
        for i, graph in enumerate(INT8_GRAPHS):
            values = [
                speedups(r["records"], name, batch)[graph] or 0.0 for name, r in measured.items()
            ]
            xs = [x + (i - (len(INT8_GRAPHS) - 1) / 2) * width for x in range(len(measured))]
            ax.bar(xs, values, width, label=graph)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(measured)), list(measured), rotation=30, ha="right")
        ax.set_ylabel(f"FP32 / int8 latency, b{batch}")
    axes[0, 0].legend(ncol=len(INT8_GRAPHS), fontsize="small")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
