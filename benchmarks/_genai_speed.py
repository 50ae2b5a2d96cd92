"""Time one onnxruntime-genai folder: greedy generation of NEW tokens after a prompt, batch 1,
prefill (the prompt's forward pass) and decode (one token at a time) timed apart, best of REPEATS
after a warm-up; and the process's peak resident memory. `llm_runtime.py` runs it in a fresh
process per model, so the peak memory is that model's alone:

    python benchmarks/_genai_speed.py FOLDER PROMPT_JSON NEW THREADS REPEATS

prints one JSON line: prefill_tok_s, decode_tok_s, peak_rss_mb, new_tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    import onnxruntime_genai as og

    folder, prompt_file = sys.argv[1], Path(sys.argv[2])
    new, threads, repeats = (int(a) for a in sys.argv[3:6])
    config = og.Config(folder)
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    prompt = json.loads(prompt_file.read_text())
    length = len(prompt) + new
    best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
    for attempt in range(repeats + 1):
        params = og.GeneratorParams(model)
        # min_length = max_length: an end-of-text token must not end the run early
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        prefilled = time.perf_counter()
        produced = 0
        while not generator.is_done():
            generator.generate_next_token()
            produced += 1
        done = time.perf_counter()
        if attempt == 0:  # warm-up: kernels packed, caches allocated
            continue
        best["prefill_tok_s"] = max(best["prefill_tok_s"], len(prompt) / (prefilled - start))
        best["decode_tok_s"] = max(best["decode_tok_s"], produced / (done - prefilled))
    print(json.dumps({**best, "peak_rss_mb": peak_rss_mb(), "new_tokens": produced}))


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM: getrusage's maxrss would carry
    the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise SystemExit("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    main()
