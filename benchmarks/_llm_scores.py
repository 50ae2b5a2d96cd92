"""The scores of the SmolLM2 page's models that are no qatkd run, each on the page's evaluation
windows and kept by `_keyed.keyed` under what it depends on: the FP teacher, the GPTQ and HQQ
copies of it (`_llm_peers.py`, scored by qatkd's own evaluation), and GGUF files scored in
llama.cpp (`_llamacpp.py`): llama.cpp's own quantizations of the teacher
(`_llamacpp_quantize.py`), the teacher's Q4_1 file, and the GGUF students' `model.gguf`."""

from __future__ import annotations

import importlib.metadata
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from _keyed import keyed
from _llamacpp import XLLAMACPP, Llama, LlamaCppLogits, library_path
from _llamacpp_quantize import quantized
from _llamacpp_quantize import version as quantizer_version
from _llm_peers import PEER_PACKAGES, PEERS, levels_per_group
from _llm_rows import Grid, Schedule
from torch.utils.data import DataLoader

from qatkd.checkpoint import content_sha256, file_sha256
from qatkd.config import Config, load_config
from qatkd.tasks.language.family import Loaded, evaluate_pretrained
from qatkd.tasks.language.source import load_pretrained, model_folder, smollm2_gguf
from qatkd.tasks.language.task import LanguageTask


def llamacpp_missing() -> list[str]:
    """The packages the llama.cpp rows need that are not installed: `xllamacpp` scores,
    `llama-cpp-python` quantizes (both: the `llamacpp` extra)."""
    missing = [] if library_path() is not None else [XLLAMACPP.split("==")[0]]
    return missing + ([] if quantizer_version() is not None else ["llama-cpp-python"])


class Scores:
    """Scores on the windows of `schedule`, kept under `work`."""

    def __init__(self, schedule: Schedule, work: Path) -> None:
        self.schedule, self.work = schedule, work
        self.config: Config = load_config(overrides=schedule.common())
        self.windows = {"overrides": schedule.common()}
        """What every score's windows (and a peer's calibration blocks) depend on beside the
        model: the evaluation text and count, the generated text's settings."""

    @cached_property
    def teacher(self) -> str:
        """The content hash of the teacher's folder."""
        return content_sha256(model_folder(self.config.model.name, self.config.model.path))

    @cached_property
    def source(self) -> Loaded:
        """The evaluation windows and the teacher's predictions on them, loaded when first
        needed (a reused score needs neither)."""
        return Loaded(self.config, training=False)

    def fp(self) -> dict[str, Any]:
        """The FP teacher's test metrics."""
        key = {"teacher": self.teacher, **self.windows}
        return keyed(self.work / "fp.json", key, lambda: evaluate_pretrained(self.config))

    def peer(self, peer: str, grid: Grid) -> dict[str, Any]:
        """`peer`'s copy of the teacher at `grid` (GPTQ calibrated on the blocks qatkd's GPTQ
        start calibrates on): its test metrics and quantization time."""
        key = {
            "teacher": self.teacher,
            "package": importlib.metadata.version(PEER_PACKAGES[peer]),
            "bits": grid.bits,
            "group": grid.group,
            "calibration_blocks": self.schedule.init_samples,
            **self.windows,
        }
        folder = self.work / f"peer_{peer}_{grid.slug(False)}"
        return keyed(folder / "metrics.json", key, lambda: self._peer(peer, grid))

    def _peer(self, peer: str, grid: Grid) -> dict[str, Any]:
        hf, _ = load_pretrained(model_folder(self.config.model.name, self.config.model.path))
        blocks = Loaded(self.config).train.tensors[0][: self.schedule.init_samples]
        weight_bits = int(grid.bits[1])
        began = time.perf_counter()
        PEERS[peer](hf, weight_bits, grid.group, blocks)
        seconds = time.perf_counter() - began
        levels = levels_per_group(hf, grid.group)
        if levels > 2**weight_bits:
            raise SystemExit(f"{peer} at {grid.name}: {levels} values in a group")
        return {**evaluate_pretrained(self.config, hf), "quantize_seconds": round(seconds, 1)}

    def gguf_student(self, folder: Path, checkpoint_sha256: str) -> dict[str, Any]:
        """A run's `model.gguf` scored in llama.cpp, kept in the run folder under the hash of
        the checkpoint it was exported from."""
        key = {"llama_cpp": XLLAMACPP, "checkpoint": checkpoint_sha256, **self.windows}
        return keyed(folder / "llamacpp.json", key, lambda: self._llamacpp(folder / "model.gguf"))

    def llamacpp_file(self, name: str, gguf: Path) -> dict[str, Any]:
        """A GGUF file scored in llama.cpp, kept as llamacpp/<name>.json."""
        key = {"llama_cpp": XLLAMACPP, "file": file_sha256(gguf), **self.windows}
        return keyed(self.work / "llamacpp" / f"{name}.json", key, lambda: self._llamacpp(gguf))

    def llamacpp_peer(self, kind: str) -> dict[str, Any]:
        """llama.cpp's `kind` quantization of the teacher's GGUF, made (or found: its name holds
        the teacher file's hash and the quantizer's version) and scored."""
        teacher = smollm2_gguf()
        made_by = f"{file_sha256(teacher)[:16]}-llama-cpp-python-{quantizer_version()}"
        out = self.work / "llamacpp" / f"{kind}-{made_by}.gguf"
        return self.llamacpp_file(kind, quantized(teacher, kind, out))

    def _llamacpp(self, gguf: Path) -> dict[str, Any]:
        """Perplexity and teacher agreement from llama.cpp's logits of the windows, scored by
        qatkd's LanguageTask, and the file's size."""
        task = LanguageTask(reference=self.source.reference_top1)
        windows = DataLoader(self.source.test, batch_size=task.eval_batch_size)
        llama = Llama(gguf, self.config.data.block_size, torch.get_num_threads())
        try:
            quality = task.evaluate(LlamaCppLogits(llama), windows)
        finally:
            llama.close()
        return {
            "test_ppl": quality["ppl"],
            "test_teacher_agreement": quality["teacher_agreement"],
            "bytes": gguf.stat().st_size,
        }
