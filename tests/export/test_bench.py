"""The speed-up arithmetic of `qatkd bench` (`add_speedups`), against ratios worked by hand."""

from __future__ import annotations

from qatkd.export.bench import add_speedups, speed_table

REFERENCE = ("onnxruntime", "fp32")


def record(model: str, backend: str, precision: str, batch: int, ms: float) -> dict:
    return {
        "model": model,
        "backend": backend,
        "precision": precision,
        "batch": batch,
        "latency_ms": ms,
        "p90_ms": ms,
        "bytes": None,
    }


def test_speedups_are_reference_latency_over_latency_per_model_and_batch():
    records = [
        record("resnet8", "pytorch", "fp32", 1, 4.0),
        record("resnet8", "onnxruntime", "fp32", 1, 2.0),
        record("resnet8", "onnxruntime", "int8", 1, 0.8),
        record("resnet8", "openvino", "int8", 1, 3.0),
        record("resnet8", "onnxruntime", "int8", 64, 12.0),
        record("resnet8", "onnxruntime", "fp32", 64, 30.0),
        record("resnet20", "onnxruntime", "fp32", 1, 7.0),
        record("resnet20", "onnxruntime", "int8", 1, 2.0),
        record("det_s", "onnxruntime", "int8", 1, 5.0),  # no FP32 reference of this model
        record("resnet8", "onnxruntime", "int8", 16, 5.0),  # nor at this batch size
    ]
    add_speedups(records, REFERENCE)
    by_hand = [
        2.0 / 4.0,  # 0.5: PyTorch is twice as slow as the reference
        1.0,  # the reference itself
        2.0 / 0.8,  # 2.5
        2.0 / 3.0,  # 0.667 (rounded to 3 decimals)
        30.0 / 12.0,  # 2.5: batch 64 against batch 64's reference, not batch 1's
        1.0,
        7.0 / 7.0,  # resnet20 against its own reference, not resnet8's
        7.0 / 2.0,  # 3.5
        None,
        None,
    ]
    assert [r["speedup"] for r in records] == [None if s is None else round(s, 3) for s in by_hand]
    assert records[3]["speedup"] == 0.667
    assert records[4]["latency_ms"] == 12.0  # the latencies are left as they were


def test_the_reference_is_the_one_named():
    records = [
        record("m", "pytorch", "fp32", 1, 4.0),
        record("m", "onnxruntime", "fp32", 1, 2.0),
        record("m", "onnxruntime", "int8", 1, 1.0),
    ]
    add_speedups(records, ("pytorch", "fp32"))
    assert [r["speedup"] for r in records] == [1.0, 2.0, 4.0]


def test_the_table_prints_each_speedup_and_a_dash_where_there_is_none():
    records = [
        record("m", "onnxruntime", "fp32", 1, 2.0),
        record("m", "onnxruntime", "int8", 1, 0.5),
        record("other", "onnxruntime", "int8", 1, 0.5),
    ]
    add_speedups(records, REFERENCE)
    rows = speed_table(records, "onnxruntime FP32").splitlines()
    assert "speedup vs onnxruntime FP32" in rows[0]
    assert rows[2] == "| m | onnxruntime | fp32 | 1 | 2.000 | 2.000 | 1.00x | - |"
    assert rows[3] == "| m | onnxruntime | int8 | 1 | 0.500 | 0.500 | 4.00x | - |"
    assert rows[4] == "| other | onnxruntime | int8 | 1 | 0.500 | 0.500 | - | - |"
