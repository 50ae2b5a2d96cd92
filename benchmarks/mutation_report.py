"""Mutation testing of the core modules with mutmut: how many small changes to the code (a `<`
turned into `<=`, a constant changed, an argument dropped) make a focused test selection fail.

    python benchmarks/mutation_report.py [--jobs N] [MODULE ...]      (what `make mutate` runs)

MODULE is one of the keys of `MODULES` below (default: all of them). Each module runs on its
own, in `.mutation/<module>/`: links to `src/` and `tests/`, a copy of `pyproject.toml` with a
`[tool.mutmut]` section naming the files to mutate and the tests to run, and mutmut's `mutants/`
folder. A run that was stopped (a session's end, Ctrl-C) resumes where it stopped when the same
command runs again, but only while `src/`, `tests/`, `pyproject.toml`, mutmut's version and the
module's selection are the same, byte for byte (`key.txt` holds their hash); anything else
starts the module from scratch. The whole `qatkd` package is copied
into `mutants/` (the tests import all of it); only the module's files are mutated. mutmut runs
each mutant against the tests that called the mutated function, in a forked worker.

Writes benchmarks/results/mutation.{md,json}. A run replaces the entries of the modules it ran
and keeps the others', each with its own commit and date; a module never run is listed as such.
A surviving mutant named in `EQUIVALENT` (with the mutated line it expects) is reported with the
reason it cannot be killed; every other survivor is a gap in the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import _mutation_progress as progress
from _provenance import command, machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".mutation"

TRAIN_TESTS = [
    "tests/test_engine.py",
    "tests/test_faults.py",
    "tests/test_learning.py",
    "tests/test_stops.py",
    "tests/test_logs.py",
    "tests/test_validation.py",
    "tests/test_tensorboard.py",
    "tests/test_check.py",
    "tests/test_distributed.py",
    "tests/balance/test_held_out.py",
]
"""The tests of every part of `train/` (each runs the trainer)."""

MODULES: dict[str, dict[str, list[str]]] = {
    "quant": {"mutate": ["src/qatkd/quant/*"], "tests": ["tests/quant"]},
    "balance": {"mutate": ["src/qatkd/balance/*"], "tests": ["tests/balance"]},
    "distill": {"mutate": ["src/qatkd/distill/*"], "tests": ["tests/distill"]},
    "train-engine": {
        "mutate": ["src/qatkd/train/engine.py"],
        "tests": TRAIN_TESTS,
    },
    "train-step": {
        "mutate": [f"src/qatkd/train/{f}.py" for f in ("step", "optim", "distributed", "held_out")],
        "tests": TRAIN_TESTS,
    },
    "train-logs": {
        "mutate": [
            f"src/qatkd/train/{f}.py"
            for f in ("logs", "plots", "tensorboard", "stops", "validation", "task")
        ],
        "tests": TRAIN_TESTS,
    },
    "export-codes": {
        "mutate": ["src/qatkd/export/codes.py", "src/qatkd/export/bias_grid.py"],
        "tests": ["tests/export"],
    },
    "export-graph": {"mutate": ["src/qatkd/export/onnx_graph.py"], "tests": ["tests/export"]},
    "export-ops": {"mutate": ["src/qatkd/export/onnx_ops.py"], "tests": ["tests/export"]},
}
"""Module -> the files mutmut mutates (globs from the repository root) and the tests it runs.
The trainer and the exporter are three modules each (about 1,800 and 1,900 mutants, each run by
slow tests), so that each part finishes within one session: a stopped run resumes only on the
machine that holds its work folder."""

_STRICT_ZIP = "the two sequences always have the same length, so `strict` never fires"
_RUNNER = "qatkd.export.codes.x_code_runner__mutmut_"
_EVEN = "an integer code times 2^(k + 1) is even, never -129 or 127: the bound moves nothing"
_RUNNER_ZIP = "for hint, value in zip(outputs, values, "
_THREADS = (
    "onnxruntime splits a kernel's work over threads by output rows, never inside a sum, so the "
    "codes are the same on 1 or 2 threads; only the speed differs"
)
_WEIGHTS = "qatkd.balance.balancers.xǁGoRǁweights__mutmut_"
_WEIGHTS_ZIP = "return dict(zip(self.weight_names, weights.tolist(), "
_MEASURED = "qatkd.balance.balancers.xǁGoRǁmeasured__mutmut_"
_MEASURED_ZIP = "return dict(zip(names, self.alignment.tolist(), "
_READ = "qatkd.distill.cache.xǁTeacherLogitCacheǁ_read__mutmut_"
_ON_CPU = (
    "the cache only writes CPU tensors (`rows` moves them before `_write`), so they load onto "
    "the CPU without `map_location`"
)
_WEIGHTS_ONLY = (
    "torch >= 2.6 (the project pins 2.14.1) loads with weights_only=True unless told otherwise; "
    "weights_only=False is killed by test_a_file_that_needs_arbitrary_unpickling_is_refused"
)
_ROWS = "qatkd.distill.cache.xǁTeacherLogitCacheǁrows__mutmut_"
_ENGINE = "qatkd.train.engine.x_"
_CUDA_RNG = (
    "not equivalent on a GPU: the CUDA generator's state is saved and restored only where the "
    "run trains on CUDA; on a CPU-only machine that branch never runs (no GPU test here)"
)
_RNG_STATES = {
    5: 'if device.type == "XXcudaXX":',
    6: 'if device.type == "CUDA":',
    7: 'states["cuda"] = None',
    8: 'states["XXcudaXX"] = torch.cuda.get_rng_state(device)',
    9: 'states["CUDA"] = torch.cuda.get_rng_state(device)',
    10: 'states["cuda"] = torch.cuda.get_rng_state(None)',
}
_SET_RNG_STATES = {
    4: 'if "cuda" in states or device.type == "cuda":',
    5: 'if "XXcudaXX" in states and device.type == "cuda":',
    6: 'if "CUDA" in states and device.type == "cuda":',
    7: 'if "cuda" not in states and device.type == "cuda":',
    8: 'if "cuda" in states and device.type != "cuda":',
    9: 'if "cuda" in states and device.type == "XXcudaXX":',
    10: 'if "cuda" in states and device.type == "CUDA":',
    11: "torch.cuda.set_rng_state(None, device)",
    12: 'torch.cuda.set_rng_state(states["cuda"], None)',
    13: "torch.cuda.set_rng_state(device)",
    14: 'torch.cuda.set_rng_state(states["cuda"], )',
    15: 'torch.cuda.set_rng_state(states["XXcudaXX"], device)',
    16: 'torch.cuda.set_rng_state(states["CUDA"], device)',
}
_TO_DEVICE = (
    "not equivalent on a GPU: `.to(None)` leaves a CPU module where it is, and the tests train "
    "on the CPU"
)
_TO_CPU = (
    "not equivalent on a GPU: a teacher on CUDA returns CUDA logits, which the CPU table cannot "
    "take without `.to('cpu')`; on a CPU-only machine nothing can tell (no GPU test here)"
)
_CHECK = "qatkd.distill.ensemble.xǁTeacherEnsembleǁcheck_num_classes__mutmut_"
_CHECK_ZIP = "for label, logits in zip(self.labels, self(example), "
_HOOKS = "qatkd.distill.ensemble.xǁTeacherEnsembleǁ__init____mutmut_"
_HOOKS_ZIP = "for teacher, label in zip(self.teachers, self.labels, "
_WITH_FEATURES = "qatkd.distill.ensemble.xǁTeacherEnsembleǁwith_features__mutmut_"
_WITH_FEATURES_ZIP = "for t, named in zip(logits, features, "
_KEEPERS = "qatkd.distill.features.xǁFeatureHooksǁ__init____mutmut_"
_KEEPERS_ZIP = "for name, module in zip(names, modules, "
_REVERSE = "qatkd.distill.losses.x_kd_reverse_kl__mutmut_"
_LAST_DIM = "`_rows` makes the logits 2-D, so dimension 1 is the last one"
_BASE = "qatkd.quant.base.xǁQuantizerǁ"
_WIDTHS_ON_CPU = (
    "not equivalent on a GPU: repeat_interleave selects with its repeats as indices, and CUDA's "
    "index_select refuses CPU ones; on a CPU-only machine nothing can tell (no GPU test here)"
)
_CONV = "qatkd.quant.modules.xǁQuantConv2dǁfrom_float__mutmut_"
_CONV_ARGS = "conv.dilation, conv.groups, "
_LINEAR = "qatkd.quant.modules.xǁQuantLinearǁfrom_float__mutmut_"
_LINEAR_NEW = "new = cls(linear.in_features, linear.out_features, "
_BIAS = (
    "`_adopt` then sets `bias` to the float layer's own (a Parameter or None), so the meta "
    "placeholder made or not first is never seen"
)
_SUMMARY = "qatkd.quant.prepare.x_quant_summary__mutmut_"
_SUMMARY_ZIP = '"  ".join(cell.ljust(width) for cell, width in zip(row, widths, '
_FLOAT_CODES = "qatkd.quant.quantizers.xǁFloatQuantizerǁ_codes__mutmut_"
_ONES = "return x, torch.ones((), "
_UNREAD = (
    "the scale `_codes` returns at 16 bits is never read: FloatQuantizer's forward returns its "
    "input, and quantize_int keeps the codes only"
)

EQUIVALENT: dict[str, tuple[str, str]] = {
    "qatkd.balance.balancers.xǁGoRǁobserve__mutmut_2": (
        "super().observe(None)",
        "`LossBalancer.observe` raises its TypeError without reading the alignments it is handed",
    ),
    f"{_WEIGHTS}29": (f"{_WEIGHTS_ZIP}strict=None))", _STRICT_ZIP),
    f"{_WEIGHTS}32": (f"{_WEIGHTS_ZIP}))", _STRICT_ZIP),
    f"{_WEIGHTS}33": (f"{_WEIGHTS_ZIP}strict=False))", _STRICT_ZIP),
    f"{_MEASURED}7": (f"{_MEASURED_ZIP}strict=None))", _STRICT_ZIP),
    f"{_MEASURED}10": (f"{_MEASURED_ZIP}))", _STRICT_ZIP),
    f"{_MEASURED}11": (f"{_MEASURED_ZIP}strict=False))", _STRICT_ZIP),
    "qatkd.balance.diagnostics.x_dot__mutmut_18": (
        "total = total.to(None) + (x.double() * y.double()).sum()",
        "not equivalent with the parameters split over two GPUs, where a 0-d tensor on one does "
        "not add to one on the other; the 0-d CPU zero adds to a tensor on any one device (the "
        "sum lands there), so on a CPU or one GPU nothing can tell (no multi-GPU test here)",
    ),
    f"{_READ}4": ("stored = torch.load(self.path, map_location=None, weights_only=True)", _ON_CPU),
    f"{_READ}7": ("stored = torch.load(self.path, weights_only=True)", _ON_CPU),
    f"{_READ}5": (
        'stored = torch.load(self.path, map_location="cpu", weights_only=None)',
        _WEIGHTS_ONLY,
    ),
    f"{_READ}8": ('stored = torch.load(self.path, map_location="cpu", )', _WEIGHTS_ONLY),
    f"{_READ}24": ("ok = None  # not a torch file, or a truncated one", "None is false too"),
    f"{_READ}26": ("ok = None  # a torch file of another layout", "None is false too"),
    f"{_ROWS}27": ("computed = compute_fn(missing).detach().to(None, self.dtype)", _TO_CPU),
    f"{_ROWS}29": ("computed = compute_fn(missing).detach().to(self.dtype)", _TO_CPU),
    "qatkd.distill.ensemble.xǁTeacherEnsembleǁtrain__mutmut_1": (
        "def train(self, mode: bool = False) -> TeacherEnsemble:",
        "`train` ignores its mode: the teachers stay in eval mode whatever it is",
    ),
    f"{_CHECK}3": (f"{_CHECK_ZIP}strict=None):", _STRICT_ZIP),
    f"{_CHECK}6": (f"{_CHECK_ZIP}):", _STRICT_ZIP),
    f"{_CHECK}8": (f"{_CHECK_ZIP}strict=False):", _STRICT_ZIP),
    f"{_HOOKS}29": (f"{_HOOKS_ZIP}strict=None)", _STRICT_ZIP),
    f"{_HOOKS}32": (f"{_HOOKS_ZIP})", _STRICT_ZIP),
    f"{_HOOKS}33": (f"{_HOOKS_ZIP}strict=False)", _STRICT_ZIP),
    f"{_WITH_FEATURES}11": (f"{_WITH_FEATURES_ZIP}strict=None)", _STRICT_ZIP),
    f"{_WITH_FEATURES}14": (f"{_WITH_FEATURES_ZIP})", _STRICT_ZIP),
    f"{_WITH_FEATURES}15": (f"{_WITH_FEATURES_ZIP}strict=False)", _STRICT_ZIP),
    f"{_KEEPERS}14": (f"{_KEEPERS_ZIP}strict=None)", _STRICT_ZIP),
    f"{_KEEPERS}17": (f"{_KEEPERS_ZIP})", _STRICT_ZIP),
    f"{_KEEPERS}18": (f"{_KEEPERS_ZIP}strict=False)", _STRICT_ZIP),
    f"{_REVERSE}8": (
        "log_p_student = F.log_softmax(_rows(student_logits).float() / temperature, dim=+1)",
        _LAST_DIM,
    ),
    f"{_REVERSE}18": (
        "kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(+1).mean()",
        _LAST_DIM,
    ),
    f"{_BASE}_reduce__mutmut_3": (
        "return op(x.reshape(-1), None)",
        "the flattened tensor is 1-D, so reducing dimension 0 is reducing every dimension (None)",
    ),
    f"{_BASE}__init____mutmut_15": (
        "self.group_widths: list[int] = None",
        "only a grouped quantizer reads `group_widths` (its numel_per_scale and `_broadcast`), and "
        "it always replaces the initial value; an ungrouped one only tests it for truth, and None "
        "is as false as []",
    ),
    f"{_BASE}__init____mutmut_35": (
        "else math.prod(weight_shape) / math.prod(self.param_shape)",
        "the division is exact (each scale covers whole rows of the weight), and the quotient "
        "only enters LSQ's gradient scale 1 / sqrt(N Q_p), the same for 27 and 27.0",
    ),
    f"{_BASE}__init____mutmut_38": (
        "else 1",
        "an activation quantizer never reads `numel_per_scale`: `_elements_per_scale` takes its N "
        "from the input",
    ),
    f"{_BASE}__init____mutmut_39": (
        "self.calibrating = None",
        "`calibrating` is only tested for truth (`training or calibrating`, `elif calibrating`) "
        "and `calibrate` sets it to True and back to False; None is as false as False",
    ),
    f"{_BASE}_broadcast__mutmut_4": (
        "widths = torch.tensor(self.group_widths, device=None)",
        _WIDTHS_ON_CPU,
    ),
    f"{_BASE}_broadcast__mutmut_6": ("widths = torch.tensor(self.group_widths, )", _WIDTHS_ON_CPU),
    f"{_CONV}9": (f'{_CONV_ARGS}None, conv.padding_mode, device="meta",', _BIAS),
    f"{_CONV}22": (f'{_CONV_ARGS}conv.bias is None, conv.padding_mode, device="meta",', _BIAS),
    f"{_LINEAR}4": (f'{_LINEAR_NEW}None, device="meta")', _BIAS),
    f"{_LINEAR}8": (f'{_LINEAR_NEW}device="meta")', _BIAS),
    f"{_LINEAR}10": (f'{_LINEAR_NEW}linear.bias is None, device="meta")', _BIAS),
    f"{_SUMMARY}38": (f"{_SUMMARY_ZIP}strict=None)).rstrip()", _STRICT_ZIP),
    f"{_SUMMARY}41": (f"{_SUMMARY_ZIP})).rstrip()", _STRICT_ZIP),
    f"{_SUMMARY}42": (f"{_SUMMARY_ZIP}strict=False)).rstrip()", _STRICT_ZIP),
    f"{_FLOAT_CODES}2": (f"{_ONES}dtype=None, device=x.device)", _UNREAD),
    f"{_FLOAT_CODES}3": (f"{_ONES}dtype=x.dtype, device=None)", _UNREAD),
    f"{_FLOAT_CODES}5": (f"{_ONES}device=x.device)", _UNREAD),
    f"{_FLOAT_CODES}6": (f"{_ONES}dtype=x.dtype, )", _UNREAD),
    "qatkd.quant.tensors.xǁLeafTracerǁis_leaf_module__mutmut_3": (
        "return isinstance(m, self.leaves) or super().is_leaf_module(m, None)",
        "fx's own is_leaf_module decides by the module's class and never reads the qualified name",
    ),
    "qatkd.quant.tensors.x_check_state_fits_shared_quantizers__mutmut_3": (
        "for name, module in model.named_modules(remove_duplicate=None):",
        "named_modules only tests `remove_duplicate` for truth, and None is false as False is",
    ),
    "qatkd.export.bias_grid.x_spare_bits__mutmut_15": (
        "while low * 2 ** (k + 1) >= -129 and high * 2 ** (k + 1) <= 127 and k < 7:",
        _EVEN,
    ),
    "qatkd.export.bias_grid.x_spare_bits__mutmut_21": (
        "while low * 2 ** (k + 1) >= -128 and high * 2 ** (k + 1) < 127 and k < 7:",
        _EVEN,
    ),
    "qatkd.export.codes.x_code_runner__mutmut_6": (
        "tensors = {OUTPUT_NAME: (OUTPUT_NAME, 1)} | activation_codes(proto)",
        "the output's zero point is never read: `run` returns the float logits as they are",
    ),
    "qatkd.export.codes.x_code_runner__mutmut_17": (
        "session = ort_session(proto.SerializeToString(), optimize=optimize)",
        _THREADS,
    ),
    "qatkd.export.codes.x_code_runner__mutmut_19": (
        "session = ort_session(proto.SerializeToString(), threads=2, optimize=optimize)",
        _THREADS,
    ),
    "qatkd.export.codes.x_code_runner__mutmut_30": (
        "hint: value if hint == OUTPUT_NAME else value.astype(None) - tensors[hint][1]",
        "the cast only keeps the uint8 codes from wrapping below zero when the zero point is "
        "subtracted; float64 (astype(None)) holds the same integers, and every reader compares "
        "values",
    ),
    f"{_RUNNER}34": (f"{_RUNNER_ZIP}strict=None)", _STRICT_ZIP),
    f"{_RUNNER}37": (f"{_RUNNER_ZIP})", _STRICT_ZIP),
    f"{_RUNNER}38": (f"{_RUNNER_ZIP}strict=False)", _STRICT_ZIP),
    "qatkd.export.codes.xǁCodeMismatchǁadd__mutmut_39": (
        "exact &= ~(diff > 0).reshape(len(exact), -2).any(1)",
        "numpy takes any negative size as the one unknown dimension: -2 reshapes as -1 does",
    ),
    "qatkd.export.codes.xǁCodeMismatchǁadd__mutmut_49": (
        "first_here = None",
        "`first_here` is only tested for truth; None is as false as False",
    ),
    "qatkd.export.codes.xǁCodeMismatchǁadd__mutmut_13": (
        "diff = np.abs(got[name].astype(None) - codes)",
        "numpy's astype(None) is astype(float64), the dtype the original names",
    ),
    "qatkd.export.codes.x_code_parity__mutmut_2": (
        'run = ""',
        "`run` is only tested for truth before the first batch sets it; '' is as false as None",
    ),
    f"{_ENGINE}epoch_seed__mutmut_1": (
        "return seed * 1_000_003 - epoch",
        "any map of (seed, epoch) to distinct integers serves; this one keeps them distinct too "
        "(killed where it does not: test_each_seed_and_epoch_draw_their_own_random_numbers)",
    ),
    f"{_ENGINE}epoch_seed__mutmut_3": (
        "return seed * 1000004 + epoch",
        "any map of (seed, epoch) to distinct integers serves; this one keeps them distinct too",
    ),
    **{f"{_ENGINE}rng_states__mutmut_{n}": (line, _CUDA_RNG) for n, line in _RNG_STATES.items()},
    **{
        f"{_ENGINE}set_rng_states__mutmut_{n}": (line, _CUDA_RNG)
        for n, line in _SET_RNG_STATES.items()
    },
    f"{_ENGINE}fit__mutmut_2": (
        "world = world and World()",
        "the pipeline and the torchrun worker always pass a World; None is only a default",
    ),
    f"{_ENGINE}fit__mutmut_5": ("model.to(None)", _TO_DEVICE),
    f"{_ENGINE}fit__mutmut_6": ("balancer.to(None)", _TO_DEVICE),
    f"{_ENGINE}fit__mutmut_23": (
        "train_set, num_replicas=world.size, rank=world.rank, seed=config.seed",
        "DistributedSampler shuffles by default (shuffle=None is killed: test_each_epoch_"
        "shuffles_the_training_images_and_the_seed_decides_the_order)",
    ),
}
"""Surviving mutant -> (its mutated line, why no test can tell it from the original). The line
ties the note to the change it was written for: mutmut numbers mutants per function, so an edit
of the function renumbers them and a stale note no longer applies."""

STATUSES = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped")


KEYED = ("src", "tests", "pyproject.toml")
"""What a module's verdicts depend on in the repository (`content_key`)."""


def mutmut_config(spec: dict[str, list[str]]) -> str:
    """The `[tool.mutmut]` section for one module (TOML arrays of strings are JSON arrays)."""
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src/qatkd"]\n'
        f"only_mutate = {json.dumps(spec['mutate'])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(spec['tests'])}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
        # torch is not fork-safe once it has run: fork the workers from a clean server process
        'process_isolation = "forkserver"\n'
    )


def tested_commit() -> str:
    """The commit whose sources and tests were mutated, flagged where they (not the benchmark
    scripts, which a run from an older commit's worktree may take from a newer one) differ."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", *KEYED)
    return git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if dirty else "")


def content_key(spec: dict[str, list[str]]) -> str:
    """Hash of everything a module's verdicts depend on: the tracked files under `src/` and
    `tests/` as they are on disk, `pyproject.toml`, mutmut's version and the module's selection."""
    tracked = subprocess.run(
        ["git", "ls-files", *KEYED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    digest = hashlib.sha256(json.dumps([version("mutmut"), spec]).encode())
    for name in sorted(tracked):
        path = ROOT / name
        if path.is_file():  # a tracked file deleted on disk is simply absent
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def prepare_work(name: str, spec: dict[str, list[str]], key: str) -> tuple[Path, float | None]:
    """The module's work folder, and the wall seconds an earlier, stopped run of the same
    content (`key`) already spent there (None for a fresh folder)."""
    work = WORK / name
    stamp, spent = work / "key.txt", work / "wall_s.txt"
    if stamp.exists() and stamp.read_text() == key and (work / "mutants").is_dir():
        print(f"mutmut: {name}: resuming the stopped run in {work}")
        return work, float(spent.read_text()) if spent.exists() else 0.0
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "src").symlink_to(ROOT / "src")
    (work / "tests").symlink_to(ROOT / "tests")
    pyproject = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + mutmut_config(spec))
    stamp.write_text(key)
    return work, None


def run_module(name: str, jobs: int) -> dict[str, Any]:
    """Run mutmut over one module (resuming a stopped run of the same content, from its work
    folder or from its committed progress); its counts, score and surviving mutants."""
    spec = MODULES[name]
    key = content_key(spec)
    work, spent = prepare_work(name, spec, key)
    started = time.time()
    print(f"mutmut: {name} ({', '.join(spec['mutate'])}; tests {' '.join(spec['tests'])})")
    if spent is None:
        saved = progress.load(name, key)
        spent = resume(name, work, saved, jobs) if saved else 0.0

    def wall() -> float:
        return round(spent + time.time() - started, 1)

    try:
        with progress.saving(name, key, tested_commit().split()[0], work, wall):
            rc = mutmut(work, jobs)
    finally:
        (work / "wall_s.txt").write_text(str(wall()))
    if rc != 0:
        log = work / "mutmut.log"
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(
            f"mutmut stopped on {name} (exit {rc}); run the same command again to resume. "
            f"The end of {log}:\n{tail}"
        )
    progress.remove(name)
    return {"wall_s": wall(), **collect(work, spec)}


def mutmut(work: Path, jobs: int, *mutants: str) -> int:
    """`mutmut run` in `work` (only `mutants` if given), its output appended to mutmut.log."""
    # mutmut puts mutants/src first on sys.path and drops src/; PYTHONPATH must not bring it back
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with (work / "mutmut.log").open("a") as out:
        return subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *mutants],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode


def resume(name: str, work: Path, saved: dict[str, Any], jobs: int) -> float:
    """Put the committed verdicts of `saved` into the fresh work folder, once one of them is
    found again live (mutmut generates the mutants and tests that one); the wall seconds they
    took, or 0 where they are not used."""
    check = progress.probe(saved["verdicts"])
    if check is None:
        return 0.0
    mutant, status = check
    rc = mutmut(work, jobs, mutant)
    live = progress.status_of(work, mutant)
    if rc != 0 or live != status:
        print(
            f"mutmut: {name}: the saved verdict on {mutant} ({status}) is {live} when tested "
            "again: the saved verdicts are not used"
        )
        return 0.0
    restored = progress.restore(work, saved["verdicts"])
    print(
        f"mutmut: {name}: {restored} verdicts restored from {progress.PROGRESS.name}/{name}.json "
        f"(commit {saved['commit']}); {mutant} tested again: {status}, as saved"
    )
    return float(saved["wall_s"])


def collect(work: Path, spec: dict[str, list[str]]) -> dict[str, Any]:
    """Counts and survivors from mutmut's `mutants/*.meta` files, read in `work`."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    counts = dict.fromkeys(STATUSES, 0)
    files: dict[str, dict[str, int]] = {}
    survivors = []
    cwd = Path.cwd()
    os.chdir(work)
    try:
        for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
            source = str(meta.relative_to("mutants"))[: -len(".meta")]
            exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
            file_counts = dict.fromkeys(STATUSES, 0)
            for key, exit_code in exit_codes.items():
                status = status_by_exit_code[exit_code]
                if status == "not checked":
                    raise SystemExit(f"{key} was not checked: the run did not finish")
                file_counts[status] = file_counts.get(status, 0) + 1
                if status not in ("killed", "timeout"):
                    survivors.append(survivor(key, status, get_diff_for_mutant(key, path=source)))
            if exit_codes:
                files[source] = {"mutants": len(exit_codes), **file_counts}
                for status, n in file_counts.items():
                    counts[status] = counts.get(status, 0) + n
    finally:
        os.chdir(cwd)
    total = sum(counts.values())
    return {
        "mutate": spec["mutate"],
        "tests": spec["tests"],
        "mutants": total,
        **counts,
        "score": round((counts["killed"] + counts["timeout"]) / total, 4) if total else None,
        "files": files,
        "survivors": survivors,
    }


def survivor(key: str, status: str, diff: str) -> dict[str, Any]:
    """One mutant that no test caught: its diff, and the reason it is equivalent if known."""
    changed = [
        line[1:].strip()
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]
    line, reason = EQUIVALENT.get(key, ("", ""))
    # a note holds only while the mutant (numbered per function) still makes the same change
    equivalent = reason if reason and line in changed else None
    return {"mutant": key, "status": status, "diff": diff, "equivalent": equivalent}


def write_report(results: dict[str, Any]) -> None:
    (RESULTS / "mutation.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# Mutation testing of the core modules",
        "",
        f"Written by `make mutate` (benchmarks/mutation_report.py), mutmut {results['mutmut']}.",
        "Each module's row names the commit and date of its own run, its section the command.",
        "A mutant is *killed* when a test fails on it, a *timeout* when the tests ran past",
        "mutmut's limit (caught too); the score is (killed + timeouts) / mutants. *Other*: no",
        "test of the selection calls the mutated function, or mutmut found the result suspicious.",
        "Not in CI (too slow); the target is 80 % per module.",
        "",
        "| module | mutated | tests | mutants | killed | survived | timeouts | other | score "
        "| wall | commit | date |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, spec in MODULES.items():
        entry = results["modules"].get(name)
        mutated = ", ".join(f"`{p.removeprefix('src/qatkd/')}`" for p in spec["mutate"])
        tests = ", ".join(f"`{t}`" for t in (entry or spec)["tests"])
        if entry is None:
            lines.append(f"| {name} | {mutated} | {tests} | not run yet |  |  |  |  |  |  |  |  |")
            continue
        other = sum(entry[s] for s in STATUSES if s not in ("killed", "survived", "timeout"))
        lines.append(
            f"| {name} | {mutated} | {tests} | {entry['mutants']} | {entry['killed']} "
            f"| {entry['survived']} | {entry['timeout']} | {other} | {percent(entry['score'])} "
            f"| {entry['wall_s'] / 60:.1f} min | {entry['commit']} | {entry['date']} |"
        )
    not_run = [name for name in MODULES if name not in results["modules"]]
    if not_run:
        lines += ["", f"**Not run yet: {', '.join(not_run)}.**"]
    lines += ["", f"Machine of the latest run: {results['machine']}.", ""]
    for name, entry in results["modules"].items():
        lines += module_section(name, entry)
    (RESULTS / "mutation.md").write_text("\n".join(lines).rstrip() + "\n")


def module_section(name: str, entry: dict[str, Any]) -> list[str]:
    lines = [
        f"## {name}",
        "",
        f"- command: `{entry['command']}` ({entry['jobs']} mutant(s) at a time)",
        f"- commit {entry['commit']}, {entry['date']}, wall time {entry['wall_s'] / 60:.1f} min",
        "",
    ]
    lines += [
        "| file | mutants | killed | survived | timeouts | other |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, c in entry["files"].items():
        other = c["mutants"] - c["killed"] - c["survived"] - c["timeout"]
        lines.append(
            f"| `{path}` | {c['mutants']} | {c['killed']} | {c['survived']} | {c['timeout']} "
            f"| {other} |"
        )
    lines.append("")
    gaps = [s for s in entry["survivors"] if not s["equivalent"]]
    equivalent = [s for s in entry["survivors"] if s["equivalent"]]
    if not entry["survivors"]:
        return [*lines, "Every mutant was caught.", ""]
    if equivalent:
        lines += [
            "Surviving mutants explained: equivalent to the original, or (where the reason says",
            "so) told apart only on a GPU, which these tests do not use:",
            "",
        ]
        for s in equivalent:
            lines += [f"- `{s['mutant']}`: {s['equivalent']}", "", *diff_block(s["diff"]), ""]
    if gaps:
        lines += [f"Surviving mutants not yet explained ({len(gaps)}): gaps in the tests.", ""]
        for s in gaps:
            lines += [f"- `{s['mutant']}` ({s['status']})", "", *diff_block(s["diff"]), ""]
    return lines


def diff_block(diff: str) -> list[str]:
    """The changed lines of a mutant's diff, as a fenced block (the hunk headers dropped)."""
    body = [
        line
        for line in diff.splitlines()
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    return ["  ```diff", *(f"  {line}" for line in body), "  ```"]


def percent(score: float | None) -> str:
    return "-" if score is None else f"{score:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite mutation.md from mutation.json, with the current EQUIVALENT notes",
    )
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    path = RESULTS / "mutation.json"
    results = json.loads(path.read_text()) if path.exists() else {"modules": {}}
    if args.render:
        for entry in results["modules"].values():
            entry["survivors"] = [
                survivor(s["mutant"], s["status"], s["diff"]) for s in entry["survivors"]
            ]
        write_report(results)
        return
    commit = tested_commit()
    results |= {"mutmut": version("mutmut"), "machine": machine()}
    for name in args.modules or list(MODULES):
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        entry = {
            "commit": commit,
            "date": date,
            "command": command(),
            "jobs": args.jobs,
            **run_module(name, args.jobs),
        }
        results["modules"][name] = entry
        results["modules"] = {m: results["modules"][m] for m in MODULES if m in results["modules"]}
        write_report(results)  # after each module: a later failure keeps the finished ones
        print(
            f"  {entry['mutants']} mutants, {entry['killed']} killed, {entry['survived']} "
            f"survived, {entry['timeout']} timeouts: {percent(entry['score'])} in "
            f"{entry['wall_s'] / 60:.1f} min"
        )


if __name__ == "__main__":
    main()
