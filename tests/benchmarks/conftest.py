"""The benchmarks' helpers (benchmarks/_*.py), imported as the benchmarks import them: by name,
from their folder."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)  # after everything else: a benchmark never shadows a package
