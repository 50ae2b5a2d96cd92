"""What each qatkd row of the SmolLM2 page runs: the weight grids, the two schedules (quick and
full) with their token budgets, and each row's command, overrides and run folder.

A row is a start point (post-training quantization: `rtn`, round-to-nearest on min-max groups;
`gptq`, `quant.method=lsq quant.init=gptq`, GPTQ of the teacher on a learned grid) or a student
trained from one: the method comparison (QAT, KD at α = 0.5, GoR in its default form and in
the held-out form, plain and normalised) from the RTN start with
min-max grids on the short budget, and the headline QAT-KD-GoR students from the GPTQ start
with learned grids, symmetric and asymmetric, on the budget picked on held-out text. Every run
of a schedule reads the same generated text; the short budget is its first blocks
(`data.train_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qatkd.balance import BalancerConfig
from qatkd.tasks.language.data import DEFAULT_EVAL_TEXT, LARGE_EVAL_TEXT


@dataclass(frozen=True)
class Grid:
    """A weight grid: bits in groups of `group` inputs, or GGUF's blocks of 32 (`gguf`: Q4_0
    symmetric, Q4_1 asymmetric)."""

    name: str
    bits: str
    group: int
    gguf: bool = False

    def overrides(self, asymmetric: bool) -> list[str]:
        if self.gguf:
            return [f"quant.format={self.slug(asymmetric)}"]
        return [f"quant.bits={self.bits}", f"quant.group_size={self.group}"] + (
            ["quant.asymmetric=true"] if asymmetric else []
        )

    def title(self, asymmetric: bool) -> str:
        """The grid's name on the page (a GGUF grid names its format)."""
        return f"GGUF {self.slug(asymmetric).upper()}" if self.gguf else self.name

    def slug(self, asymmetric: bool) -> str:
        if self.gguf:
            return "q4_1" if asymmetric else "q4_0"
        return f"{self.bits}_g{self.group}" + ("_asym" if asymmetric else "")


W4 = Grid("W4 g128", "W4A16", 128)
GGUF = Grid("GGUF W4 g32", "W4A16", 32, gguf=True)
W3 = Grid("W3 g128", "W3A16", 128)
W2 = Grid("W2 g64", "W2A16", 64)
GRIDS = (W4, GGUF, W3, W2)
"""Every grid, in the page's order."""


@dataclass(frozen=True)
class Schedule:
    """One mode of the benchmark. `samples` teacher-generated samples of `data.block_size` (128)
    new tokens each; the probe and the method comparison train on the first `short_blocks`
    blocks; GPTQ calibrates on the first `init_samples` (never more than the short budget, so
    every GPTQ start is the same); `rates` are probed on held-out text."""

    quick: bool
    samples: int
    short_blocks: int
    init_samples: int
    rates: tuple[float, ...]
    headline: tuple[Grid, ...]
    compared: tuple[Grid, ...]
    peers: tuple[Grid, ...]

    @property
    def eval_text(self) -> tuple[Path, str]:
        """The evaluation text and its name: the GPL-3 (quick) or the Debian Policy Manual."""
        return (DEFAULT_EVAL_TEXT, "GPL-3") if self.quick else (LARGE_EVAL_TEXT, "Debian Policy")

    @property
    def windows(self) -> int:
        """Evaluation windows scored: 800 windows of 128 tokens at stride 64 score 51,263."""
        return 30 if self.quick else 800

    def common(self) -> list[str]:
        """Overrides of every run, the learning rate and budget aside."""
        return [
            "task=language",
            "train.epochs=1",
            "train.bf16=true",
            f"data.eval_files=[{self.eval_text[0]}]",
            f"data.test_limit={self.windows}",
            f"data.generate_samples={self.samples}",
        ]


QUICK = Schedule(
    quick=True,
    samples=48,
    short_blocks=16,  # 2,048 tokens: more than the 1,536 inputs of SmolLM2's down projections,
    init_samples=16,  # so that GPTQ's Hessians are not singular
    rates=(5e-4, 1e-3),
    headline=(GGUF, W3),
    compared=(W3,),
    peers=(W3,),
)
FULL = Schedule(
    quick=False,
    samples=10240,  # about 119 tokens each: 1.1M training tokens beside the held-out prompts
    short_blocks=1024,  # 131k tokens
    init_samples=128,
    # low rates too: AdamW moves LSQ's learned steps by about the rate each step, and the
    # quick run's students fell behind their GPTQ starts at 1e-3
    rates=(5e-5, 1e-4, 2e-4, 5e-4, 1e-3),
    headline=(W4, GGUF, W3),
    compared=(W3, W2, W4),
    peers=(W4, W3),
)

GPTQ_START = ["quant.method=lsq", "quant.init=gptq"]
METHODS = {
    "rtn": ("ptq", ["quant.method=minmax"]),
    "gptq": ("ptq", GPTQ_START),
    "qat": ("train", []),
    "kd_fixed_0.5": ("distill", ["balancer.name=fixed", "balancer.alpha=0.5"]),
    "kd_gor": ("distill", ["balancer.name=gor", f"balancer.form={BalancerConfig().form}"]),
    "kd_gor_heldout": ("distill", ["balancer.name=gor", "balancer.form=heldout"]),
    "kd_gor_heldout_normalized": (
        "distill",
        ["balancer.name=gor", "balancer.form=heldout", "balancer.normalize=true"],
    ),
}
"""Each row method's command and overrides; GoR's form is named, so that runs of another form
are not reused."""
COMPARED = ("qat", "kd_fixed_0.5", "kd_gor", "kd_gor_heldout", "kd_gor_heldout_normalized")
TEACHER = "teachers=[smollm2-135m]"


@dataclass(frozen=True)
class Row:
    """A qatkd row: `method` on `grid`; a trained row starts from `start` (`rtn`: min-max grids,
    `gptq`: learned grids from GPTQ) and trains on the first `blocks` training blocks (None:
    all of them)."""

    method: str
    grid: Grid
    start: str = "rtn"
    asymmetric: bool = False
    blocks: int | None = None

    @property
    def trained(self) -> bool:
        return METHODS[self.method][0] != "ptq"

    @property
    def label(self) -> str:
        """The row's name on the page."""
        grid = "asymmetric" if self.asymmetric else "symmetric"
        if not self.trained:
            return f"{self.method} start ({grid})"
        learned = "learned" if self.start == "gptq" else "min-max"
        return f"{self.method} from {self.start} ({grid}, {learned})"

    def folder(self, work: Path, lr: float) -> Path:
        name = f"{self.method}_{self.grid.slug(self.asymmetric)}"
        if self.trained:
            budget = "all" if self.blocks is None else f"b{self.blocks}"
            name += f"_from_{self.start}_{budget}_lr{lr:g}"
        return work / name

    def command(self, schedule: Schedule, lr: float) -> tuple[str, list[str]]:
        """`qatkd <command> <overrides>` of the row (its `out` aside)."""
        command, extra = METHODS[self.method]
        overrides = [*schedule.common(), *self.grid.overrides(self.asymmetric), *extra]
        gptq = self.method == "gptq" or self.start == "gptq"
        if gptq:
            overrides.append(f"quant.init_samples={schedule.init_samples}")
        if not self.trained:
            return command, overrides
        overrides += GPTQ_START if self.start == "gptq" else METHODS["rtn"][1]
        overrides.append(f"train.lr={lr}")
        if self.blocks is not None:
            overrides.append(f"data.train_limit={self.blocks}")
        return command, overrides + ([TEACHER] if command == "distill" else [])


def probe(grid: Grid, blocks: int | None) -> Row:
    """The row of `grid` trained at every probed rate on the short budget (the rate is picked on
    its held-out perplexity, per headline grid) and, for `BUDGET_GRID`, on all the text at the
    picked rate (the step count is picked the same way): QAT-KD-GoR from the GPTQ start."""
    return Row("kd_gor", grid, "gptq", blocks=blocks)


BUDGET_GRID = W3
"""The grid whose probe also picks the step count, and whose short-budget probe is a page row."""


def page_rows(schedule: Schedule, blocks: int | None) -> list[Row]:
    """The qatkd rows of the page in order, the headline students on `blocks`: per grid the RTN
    start and the method comparison, the GPTQ starts and the students trained from them (at W3
    g128 also the probe's student on the short budget)."""
    rows = []
    for grid in GRIDS:
        if grid not in schedule.headline + schedule.compared:
            continue
        rows.append(Row("rtn", grid))
        if grid in schedule.compared:
            rows += [Row(m, grid, blocks=schedule.short_blocks) for m in COMPARED]
        if grid not in schedule.headline:
            continue
        for asymmetric in (False, True):
            rows.append(Row("gptq", grid, "gptq", asymmetric))
            student = Row("kd_gor", grid, "gptq", asymmetric, blocks)
            short = replace(student, blocks=schedule.short_blocks)
            if grid == BUDGET_GRID and not asymmetric and short != student:
                rows.append(short)  # the probe's run at the picked rate
            rows.append(student)
    return rows
