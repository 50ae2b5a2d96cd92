"""The training-curves figure of a run folder, redrawn from its CSV logs at the end of an epoch
once a minute at most (`REDRAW_SECONDS`), after the run's last epoch, and when a stop signal
stops it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from qatkd.train.logs import read_csv

REDRAW_SECONDS = 60.0
"""The least time between two drawings during a run: a figure takes about 0.3 s to draw, as
long as an epoch of a small run, and a person looks at it far less often."""


def plot_run(run_dir: Path, title: str) -> Path:
    """Loss, accuracy, the balancer's effective weights, the alignments it learns from and the
    gradient conflict, as available."""
    steps, epochs = read_csv(run_dir / "steps.csv"), read_csv(run_dir / "log.csv")
    weight_keys = sorted({k for r in steps for k in r if k.startswith("w_")})
    align_keys = sorted({k for r in steps for k in r if k.startswith("align_")})
    panels = ["loss", "metric"]
    if weight_keys:
        panels.append("weights")
    if align_keys:
        panels.append("alignment")
    if any("grad_ratio" in r for r in steps):
        panels.append("conflict")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            for key in ("loss", "l_ts", "l_kd"):
                pts = [(r["step"], r[key]) for r in steps if key in r]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", label=key)
            ax.set(xlabel="step", title="training loss", yscale="log")
        elif panel == "metric":
            metric_keys = sorted(
                {k for r in epochs for k in r if k.startswith(("train_", "val_", "test_"))}
            )
            for key in metric_keys:
                if key.endswith("loss"):
                    continue
                pts = [(r["epoch"], r[key]) for r in epochs if key in r]
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
            ax.set(xlabel="epoch", title="accuracy (%)")
        elif panel in ("weights", "alignment"):
            for key in weight_keys if panel == "weights" else align_keys:
                pts = [(r["step"], r[key]) for r in steps if key in r]
                ax.plot(*zip(*pts, strict=True), marker=".", label=key)
            if panel == "weights":
                ax.set(xlabel="step", title="balancer effective weights")
            else:
                ax.set(xlabel="step", title="cos(∇L_held, ∇L_k)", ylim=(-1, 1))
        else:
            pts = [
                (r["step"], r["grad_ratio"], r["grad_cosine"]) for r in steps if "grad_ratio" in r
            ]
            s, ratio, cosine = zip(*pts, strict=True)
            ax.plot(s, ratio, marker=".", label="‖∇TS‖/‖∇KD‖")
            ax.set(xlabel="step", title="gradient conflict", yscale="log")
            twin = ax.twinx()
            twin.plot(s, cosine, color="tab:red", marker=".", label="cosine")
            twin.set_ylim(-1, 1)
            twin.legend(loc="lower right", fontsize=8)
        if ax.get_lines():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
