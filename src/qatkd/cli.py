"""The `qatkd` command: `qatkd <command> [--config FILE] [key=value ...]`.

Exit statuses: 0 done; 2 a user mistake (one line on stderr; `--debug` shows the traceback
instead); 130 / 143 a run stopped by SIGINT / SIGTERM after saving its position (resumable); 1 an
unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qatkd.checkpoint import checkpoint_path
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.progress import Settings
from qatkd.reference import help_lines
from qatkd.train.stops import RunStopped

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130
QUIET_HELP = "print only the result lines: no progress, no per-epoch lines"


def _print_metrics(run_dir: Path | None, metrics: dict[str, Any]) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(json.dumps(shown, indent=2))
    if run_dir is not None:
        print(f"run folder: {run_dir}")


def cmd_train(args: argparse.Namespace) -> None:
    from qatkd import pipeline

    if args.resume:
        if args.overrides or args.config:
            raise QatkdError(
                "--resume continues a run with its saved config: drop --config and key=value"
            )
        _print_metrics(*pipeline.resume(args.resume))
        return
    run = pipeline.distill if args.command == "distill" else pipeline.train
    _print_metrics(*run(load_config(args.config, args.overrides)))


def cmd_ptq(args: argparse.Namespace) -> None:
    from qatkd import pipeline

    _print_metrics(*pipeline.ptq(args.ckpt, args.overrides, args.config))


def cmd_eval(args: argparse.Namespace) -> None:
    from qatkd import pipeline

    _print_metrics(None, pipeline.evaluate(args.ckpt, args.overrides))


def cmd_export(args: argparse.Namespace) -> None:
    from qatkd import pipeline

    if not (args.run or args.ckpt):
        raise QatkdError("export needs a run folder (qatkd export RUN_DIR) or --ckpt PATH")
    result = pipeline.export(args.run or args.ckpt, args.out, args.data_limit)
    if "parity" not in result:  # language: packed weights, hf/ and genai/, printed whole
        print(json.dumps(result, indent=2))
        return
    parity = result["parity"]["onnxruntime"]
    print(
        json.dumps(
            {
                "bytes": result["bytes"],
                "integer_kernels": result["integer_kernels"],
                "parity": parity,
            },
            indent=2,
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from qatkd import pipeline
    from qatkd.export.run import BENCH_MD

    pipeline.bench(args.run, args.threads, tuple(args.batch), args.repeats, args.data_limit)
    print((checkpoint_path(args.run).parent / BENCH_MD).read_text())


def cmd_check(args: argparse.Namespace) -> None:
    from qatkd import pipeline

    config = load_config(args.config, args.overrides)
    print("\n".join(pipeline.check_lines(pipeline.check(config, args.run_command))))


def cmd_demo(args: argparse.Namespace) -> None:
    from qatkd.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatkd", description="Small quantized models by QAT + knowledge distillation with GoR."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    # SUPPRESS: a subcommand's unset flag must not reset the value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    keys_help = "config keys (key = default):\n" + "\n".join(help_lines())

    def add(
        name: str,
        help_text: str,
        handler: Callable[[argparse.Namespace], None],
        configurable: bool = True,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=keys_help if configurable else None,
        )
        if configurable:
            p.add_argument(
                "--config", metavar="FILE", help="YAML config (default: built-in defaults)"
            )
            p.add_argument(
                "overrides",
                nargs="*",
                metavar="key=value",
                help="dotted config overrides, values parsed as YAML",
            )
        p.set_defaults(handler=handler)
        return p

    for name, text in (
        ("train", "train on labels: FP32 teachers/students, or plain QAT with quant.bits"),
        ("distill", "train a (quantized) student from teachers with a loss balancer"),
    ):
        add(name, text, cmd_train).add_argument(
            "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt"
        )
    add(
        "ptq",
        "post-training quantization of an FP32 checkpoint, or of the pretrained language model "
        "of a task=language config (calibration only)",
        cmd_ptq,
    ).add_argument("--ckpt", metavar="PATH", help="FP32 checkpoint (classification)")
    add(
        "check",
        "check a run before starting it: every setting a later stage would refuse, then a few "
        "real steps; prints the model, data, steps, seconds a step, estimated time, peak memory",
        cmd_check,
    ).add_argument(
        "--command",
        dest="run_command",
        choices=("train", "distill", "ptq"),
        default="train",
        help="the command to check (default: train)",
    )
    p = add("eval", "evaluate a checkpoint on its test set (data.* overrides allowed)", cmd_eval)
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint or run folder")
    p = add(
        "export",
        "write the int8 ONNX (QDQ), FP32 ONNX and packed low-bit weights of a "
        "quantized checkpoint, and check parity",
        cmd_export,
        configurable=False,
    )
    p.add_argument("run", nargs="?", metavar="RUN_DIR", help="run folder (its last.pt)")
    p.add_argument("--ckpt", metavar="PATH", help="a checkpoint file instead of a run folder")
    p.add_argument("--out", metavar="DIR", help="where to write (default: beside the checkpoint)")
    p.add_argument("--data-limit", type=int, metavar="N", help="parity on the first N test images")
    p = add(
        "bench",
        "latency, size and parity of the exported model vs FP32, every backend",
        cmd_bench,
        configurable=False,
    )
    p.add_argument("run", metavar="RUN_DIR", help="run folder (exported first if needed)")
    p.add_argument("--threads", type=int, default=2, help="threads for every backend (2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (1 64)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per setting (20)")
    p.add_argument("--data-limit", type=int, metavar="N", help="parity on the first N test images")
    p = add("demo", "the end-to-end demo on Fashion-MNIST", cmd_demo, configurable=False)
    p.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every stage, e.g. data.root=DIR train.threads=2",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo (for tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet, Settings.quiet = Settings.quiet, args.quiet
    try:
        args.handler(args)
    except RunStopped as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"qatkd: {stopped}; continue with: qatkd {args.command} --resume {stopped.run_dir}",
                file=sys.stderr,
            )
        return stopped.exit_status
    except QatkdError as e:
        if args.debug:
            raise
        print(f"qatkd: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "qatkd: interrupted; a train/distill run continues with --resume RUN_DIR",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        print(
            f"qatkd: internal error: {type(e).__name__}: {e} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    finally:
        Settings.quiet = quiet  # `main` called from Python leaves the process as it found it
    return 0


if __name__ == "__main__":
    sys.exit(main())
