"""The roofline model (``benchmarks/roofline.py``) is tied to the code: the launchers' byte counts equal the bytes the
kernels touch, the recorded products equal the cost model's FLOPs, the chunking is the workspace's, a small case's
bytes equal a hand count, and the command line prints estimates, writes complete JSON and refuses bad shapes.

All on CPU: the byte checks run the launchers under the Triton interpreter at tiny shapes, the rest records launch
sequences on meta tensors (nothing is computed).  About 15 s in all, most of it the paper-shape command.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import roofline
from benchmarks.launch_trace import LaunchTrace, span_bytes, trace
from kidkernels.ops.config import NUM_STATS, DistillConfig
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
needs_interpreter = pytest.mark.skipif(
    DEVICE != "cpu" or importlib.util.find_spec("triton") is None,
    reason="counts the addresses the kernels touch under the Triton interpreter (CPU tensors)")


# ---- the launchers' byte counts against the addresses the kernels touch -----------------------------------------

class TouchedBytes:
    """Unique bytes loaded and stored by the kernels run under the Triton interpreter while active: every masked-in
    lane of every ``tl.load`` / ``tl.store``, each address counted once (as the launchers count each element once)."""

    def __init__(self, monkeypatch):
        import triton.runtime.interpreter as interpreter

        builder = interpreter.interpreter_builder
        self.loads: list[tuple[np.ndarray, int]] = []
        self.stores: list[tuple[np.ndarray, int]] = []
        load, store = builder.create_masked_load, builder.create_masked_store

        def addresses(ptrs, mask):
            return np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel(), \
                ptrs.get_element_ty().primitive_bitwidth // 8

        def counted_load(ptrs, mask, other, cache_policy, is_volatile):
            self.loads.append(addresses(ptrs, mask))
            return load(ptrs, mask, other, cache_policy, is_volatile)

        def counted_store(ptrs, value, mask, cache_policy):
            self.stores.append(addresses(ptrs, mask))
            return store(ptrs, value, mask, cache_policy)

        monkeypatch.setattr(builder, "create_masked_load", counted_load)
        monkeypatch.setattr(builder, "create_masked_store", counted_store)

    @staticmethod
    def _unique(records) -> int:
        by_size: dict[int, list] = {}
        for addrs, size in records:
            by_size.setdefault(size, []).append(addrs)
        return sum(size * np.unique(np.concatenate(a)).size for size, a in by_size.items())

    def total(self) -> int:
        return self._unique(self.loads) + self._unique(self.stores)

    def reset(self) -> None:
        self.loads.clear()
        self.stores.clear()


def _record_and_touch(monkeypatch, module, call) -> tuple[list, list[int]]:
    """The launch records of ``call`` (launching from ``module``) and the bytes each launch touched."""
    from kidkernels.ops import launches

    touched = TouchedBytes(monkeypatch)
    per_launch: list[int] = []

    def launch_and_count(*args, **kwargs):
        touched.reset()
        launches.launch(*args, **kwargs)
        per_launch.append(touched.total())

    monkeypatch.setattr(module, "launch", launch_and_count)
    with launches.recording() as records:
        call()
    return records, per_launch


ROWS, VOCAB = 6, 75  # a ragged last vocabulary tile with the tile width lowered to 32


@pytest.fixture
def small_tiles(monkeypatch):
    from kidkernels.ops import tiles

    monkeypatch.setattr(tiles, "MAX_BLOCK_V", 32)


def _logits(dtype, g, rows=ROWS, vocab=VOCAB):
    return (torch.randn(rows, vocab, generator=g) * 3).to(dtype)


@needs_interpreter
@pytest.mark.parametrize("divergence, temperature, teacher, dtype", [
    ("rkl", 1.0, True, torch.bfloat16),
    ("fkl", 2.0, True, torch.float32),   # separate MLE log-sum-exp
    ("jsd", 1.0, True, torch.bfloat16),  # two forward passes
    ("tvd", 1.0, True, torch.float16),
    ("fkl", 1.0, False, torch.bfloat16),  # the cross-entropy alone: no teacher
], ids=["rkl-bf16", "fkl-T2-fp32", "jsd-bf16", "tvd-fp16", "ce-only"])
@pytest.mark.parametrize("row_weight", ["broadcast", "per-row", "none"])
def test_distill_launch_bytes_equal_the_bytes_the_kernels_touch(monkeypatch, small_tiles, divergence, temperature,
                                                                teacher, dtype, row_weight):
    from kidkernels.ops import distill_triton

    g = torch.Generator().manual_seed(0)
    cfg = DistillConfig(divergence, 0.5, temperature, 1.0 if teacher else 0.0, 1.0, -100, True, has_teacher=teacher)
    student = _logits(dtype, g)
    teach = _logits(torch.bfloat16, g) if teacher else None
    target = torch.randint(0, VOCAB, (ROWS,), generator=g)
    stats = torch.empty(NUM_STATS, ROWS + 3)[:, 2:2 + ROWS]  # a slice of a wider array, as the chunks use
    weights = {"broadcast": torch.full((1,), 0.25).expand(ROWS), "per-row": torch.rand(ROWS, generator=g),
               "none": None}[row_weight]
    # float32 inputs: the gradient overwrites the student logits (the dispatch layer's aliasing)
    grad = student if dtype == torch.float32 else torch.empty(ROWS, VOCAB, dtype=dtype)

    records, touched = _record_and_touch(
        monkeypatch, distill_triton, lambda: distill_triton.fill_stats(student, teach, target, stats, cfg))
    assert [r.kernel for r in records] == ["distill_stats_kernel"] + ([] if cfg.one_pass else ["distill_value_kernel"])
    assert [r.hbm_bytes for r in records] == touched
    assert all(r.flops == 0 for r in records)
    records, touched = _record_and_touch(
        monkeypatch, distill_triton,
        lambda: distill_triton.write_grad(student, teach, target, stats, cfg, weights, grad))
    assert [r.kernel for r in records] == ["distill_grad_kernel"]
    assert [records[0].hbm_bytes] == touched
    # the hand count of the sweep: both logits read once, the gradient written once
    sweep = ROWS * VOCAB * (student.element_size() + (2 if teacher else 0) + grad.element_size())
    assert sweep < records[0].hbm_bytes < sweep + ROWS * (8 + 8 * 4 + 4) + 1


@needs_interpreter
def test_ignored_rows_touch_less_than_counted(monkeypatch, small_tiles):
    from kidkernels.ops import distill_triton

    g = torch.Generator().manual_seed(1)
    cfg = DistillConfig("rkl", 0.5, 1.0, 1.0, 1.0, -100, True)
    student, teach = _logits(torch.bfloat16, g), _logits(torch.bfloat16, g)
    target = torch.randint(0, VOCAB, (ROWS,), generator=g)
    target[::2] = -100
    stats = torch.empty(NUM_STATS, ROWS)
    records, (touched,) = _record_and_touch(
        monkeypatch, distill_triton, lambda: distill_triton.fill_stats(student, teach, target, stats, cfg))
    # The launcher cannot see the targets (no host sync): it counts every row as swept.  An ignored row reads its
    # target and writes all NUM_STATS (= the 10 a counted RKL row writes) but not its two bf16 logit rows.
    assert records[0].hbm_bytes - touched == 3 * VOCAB * (2 + 2)


@needs_interpreter
@pytest.mark.parametrize("statistic", ["entropy", "argmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_selection_launch_bytes_equal_the_bytes_the_kernels_touch(monkeypatch, small_tiles, statistic, dtype):
    from kidkernels.ops import selection_triton

    logits = _logits(dtype, torch.Generator().manual_seed(2))
    if statistic == "entropy":
        out = torch.empty(ROWS)
        records, (touched,) = _record_and_touch(monkeypatch, selection_triton,
                                                lambda: selection_triton.entropy(logits, 0.5, out))
    else:
        out = torch.empty(ROWS, dtype=torch.int64)
        records, (touched,) = _record_and_touch(monkeypatch, selection_triton,
                                                lambda: selection_triton.argmax(logits, out))
    assert len(records) == 1 and records[0].hbm_bytes == touched
    assert touched == ROWS * VOCAB * logits.element_size() + ROWS * out.element_size()


# ---- the recorded launch sequences -------------------------------------------------------------------------------

N, H_S, H_T, V = 37, 24, 40, 1001  # odd sizes: ragged chunks


def _problem(n=N, h_s=H_S, h_t=H_T, v=V, **kw) -> roofline.Problem:
    return roofline.Problem(n, h_s, h_t, v, **kw)


def _impl(key: str, impls=roofline.LOSS_IMPLEMENTATIONS) -> roofline.Implementation:
    return next(i for i in impls if i.key == key)


def _flops(result) -> int:
    return sum(x.flops for x in result.launches)


@pytest.mark.parametrize("divergence", ["rkl", "jsd"])
@pytest.mark.parametrize("rows", [5, 37])
def test_kidkernels_products_and_chunks_equal_the_hand_count(divergence, rows):
    # bf16: float32 student and teacher logits (4 + 4 bytes) and the bf16 gradient (2) per element of a chunk
    workspace = V * (4 + 4 + 2) * rows
    p = _problem(divergence=divergence, workspace_bytes=workspace)
    forward, backward = 2 * N * V * (H_S + H_T), 2 * 2 * N * V * H_S
    results = {r.impl.key: r for r in roofline.record_all(
        [i for i in roofline.LOSS_IMPLEMENTATIONS if i.kidkernels], p)}
    rows_path = results["triton_rows"]
    assert rows_path.ok and _flops(rows_path) == forward + backward == p.loss_floor_flops()
    chunks = math.ceil(N / rows)
    kernels = [x.label for x in rows_path.launches if x.source == "triton"]
    passes = ["distill_stats_kernel"] + (["distill_value_kernel"] if divergence == "jsd" else []) + \
        ["distill_grad_kernel"]
    assert kernels == passes * chunks
    for logits in ("x_s @ W_s^T", "x_t @ W_t^T"):  # float32 logits of each chunk ([r, V], or [N, V] for one chunk)
        assert sum(x.label.startswith(f"aten.mm.dtype {logits} -> f32[") for x in rows_path.launches) == chunks
    fused = results["triton"]
    if fused.ok:  # the GEMM-fused kernels: the floor's products, plus whole recomputed products if any
        extra = _flops(fused) - (forward + backward)
        assert extra >= 0 and extra % (2 * N * V * math.gcd(H_S, H_T)) == 0
    else:
        assert not fused.failed, fused.unavailable


@pytest.mark.parametrize("statistic", ["entropy", "argmax"])
def test_selection_products_equal_the_student_logits_product(statistic):
    rows = 4
    p = _problem(workspace_bytes=V * 4 * rows)
    for result in roofline.record_all(roofline.selection_implementations(statistic), p):
        if result.ok:
            assert _flops(result) == 2 * N * V * H_S == p.selection_floor_flops(), result.impl.key
        else:
            assert result.impl.key == "triton" and not result.failed, result.unavailable
    rows_path = roofline.record(_impl("triton_rows", roofline.selection_implementations(statistic)), p)
    assert [x.label for x in rows_path.launches if x.source == "triton"] == \
        [f"row_{statistic}_kernel"] * math.ceil(N / rows)


def test_peers_products_equal_the_cost_model():
    p = _problem()
    for key in ("eager", "eager_bf16_mm", "torch_compile"):
        assert _flops(roofline.record(_impl(key), p)) == p.loss_floor_flops(), key
    liger = roofline.record(_impl("liger_chunked"), p)
    if importlib.util.find_spec("liger_kernel") is None:
        assert not liger.ok and "liger_kernel is not importable" in liger.unavailable
    else:
        assert liger.ok and _flops(liger) == p.loss_floor_flops()
        assert liger.host_reads  # its backward asks on the host whether the upstream gradient is 1


def test_triton_rows_bytes_of_a_small_case_equal_a_hand_count():
    n, h_s, h_t, v, rows = 6, 20, 28, 40, 4  # two chunks: 4 rows and 2
    p = _problem(n, h_s, h_t, v, workspace_bytes=v * (4 + 4 + 2) * rows)
    result = roofline.record(_impl("triton_rows"), p)
    by_label: dict[str, int] = {}
    for x in result.launches:
        by_label[x.label] = by_label.get(x.label, 0) + x.hbm_bytes
    chunks = (4, 2)
    per_chunk = {  # r rows: operands read once, results written once (bf16 inputs 2 B, float32 4 B, target 8 B)
        "aten.mm.dtype x_s @ W_s^T -> f32[r,V]": lambda r: r * h_s * 2 + v * h_s * 2 + r * v * 4,
        "aten.mm.dtype x_t @ W_t^T -> f32[r,V]": lambda r: r * h_t * 2 + v * h_t * 2 + r * v * 4,
        # both logits, the targets, 10 statistics written (RKL: one pass)
        "distill_stats_kernel": lambda r: r * v * 8 + r * 8 + r * 10 * 4,
        # both logits, the targets, 8 statistics read, the broadcast row weight (one float), the bf16 gradient
        "distill_grad_kernel": lambda r: r * v * 8 + r * 8 + r * 8 * 4 + 4 + r * v * 2,
        "aten.mm.out bf16[r,V] @ W_s -> bf16[r,H_s]": lambda r: r * v * 2 + v * h_s * 2 + r * h_s * 2,
        # the float32 weight-gradient accumulator is read and written by every chunk's product
        "aten.addmm.dtype_out bf16[r,V]^T @ x_s -> f32[V,H_s]": lambda r: r * v * 2 + r * h_s * 2 + 2 * v * h_s * 4,
    }
    for label, count in per_chunk.items():
        assert by_label.pop(label) == sum(count(r) for r in chunks), label
    assert by_label.pop("aten.zeros -> f32[V,H_s]") == v * h_s * 4  # the accumulator starts at 0
    # the backward hands the gradients out times the upstream gradient: dx in place, dW rounded to bf16
    assert by_label.pop("aten.mul_.Tensor -> bf16[N,H_s]") == 2 * n * h_s * 2 + 4
    assert by_label.pop("aten.mul.out -> bf16[V,H_s]") == v * h_s * 4 + 4 + v * h_s * 2
    # what is left: target checks, the mean's denominator and reductions over the N rows
    small = [x for x in result.launches if x.label in by_label]
    assert small and all(x.hbm_bytes <= 3 * 8 * n + 16 and x.flops == 0 for x in small)


def test_trace_prices_aten_ops_from_their_operands():
    m = dict(device="meta")
    a, b = torch.empty(8, 16, dtype=torch.bfloat16, **m), torch.empty(16, 4, dtype=torch.bfloat16, **m)
    acc = torch.empty(8, 4, **m)
    x = torch.empty(8, 4, **m)
    idx = torch.empty(8, 1, dtype=torch.int64, **m)

    def ops():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # reads and writes the accumulator
        x.t().expand(1, 4, 8)  # views: nothing
        x.sum()
        torch.zeros(8, 4, **m)
        x.copy_(acc)
        x.gather(1, idx)
        x.mul_(2.0)

    launches = trace(ops).launches
    assert [(y.flops, y.hbm_bytes) for y in launches] == [
        (2 * 8 * 16 * 4, 2 * 8 * 4 * 4 + 8 * 16 * 2 + 16 * 4 * 2), (0, 8 * 4 * 4 + 4), (0, 8 * 4 * 4),
        (0, 2 * 8 * 4 * 4), (0, 8 * 4 + 8 * 8 + 8 * 4), (0, 2 * 8 * 4 * 4)]
    assert span_bytes(torch.empty(1, **m).expand(100)) == 4
    label = LaunchTrace([], dims={"N": 9, "V": 40}).describe
    assert (label(torch.empty(7, 40, **m)), label(torch.empty(9, 40, **m)), label(torch.empty(9, 40, **m).t())) == \
        ("f32[r,V]", "f32[N,V]", "f32[N,V]^T")  # a chunk's rows are "r"


# ---- the command line --------------------------------------------------------------------------------------------

def test_paper_shape_prints_estimates_and_writes_complete_json(tmp_path):
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--shape", "paper",
                           "--sweep-workspace", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "estimate" in text.lower() and "triton_rows" in text and "4.461 TFLOP" in text
    report = json.loads(out.read_text())
    assert report["estimate"] is True and report["kind"] == "roofline estimate" and report["failed"] == []
    assert report["shape"] == dict(n=2048, h_s=1024, h_t=4096, v=151_936)
    assert set(report["gpus"]) == {"h100", "h200"}
    sections = [report["loss"], report["selection"]["entropy"], report["selection"]["argmax"]]
    for section in sections:
        assert section["floor_flops"] > 0 and set(section["floor_est_ms"]) == {"h100", "h200"}
        keys = [i["implementation"] for i in section["implementations"]]
        assert keys[:2] == ["triton_rows", "triton"]
        for impl in section["implementations"]:
            assert impl["status"] in ("ok", "not available"), impl
            if impl["status"] != "ok":
                assert impl["reason"]
                continue
            total = impl["total"]
            assert total["flops"] == section["floor_flops"] or impl["implementation"] == "triton"
            assert sum(g["count"] for g in impl["launches"]) == total["launches"]
            assert sum(g["hbm_bytes"] for g in impl["launches"]) == total["hbm_bytes"]
            for gpu in ("h100", "h200"):
                assert total["x_floor"][gpu] == pytest.approx(total["est_ms"][gpu] / section["floor_est_ms"][gpu])
                assert total["est_ms"][gpu] == pytest.approx(sum(g["est_ms"][gpu] for g in impl["launches"]))
    rows = report["workspace_sweep"]["loss"]
    assert [r["workspace_mib"] for r in rows] == list(roofline.WORKSPACE_SWEEP_MIB)
    assert all(set(r["triton_rows"]) == {"h100", "h200"} for r in rows)
    # a larger workspace means fewer chunks, each reading the heads once: never slower for this path
    ratios = [r["triton_rows"]["h100"]["x_floor"] for r in rows]
    assert ratios[0] > ratios[-1]


@pytest.mark.parametrize("shape", ["1,2,3", "a,b,c,d", "0,1024,4096,151936", "paper,1", "1,2,3,4,5", ""])
def test_bad_shapes_are_one_line_and_exit_2(capsys, shape):
    with pytest.raises(SystemExit) as exit_info:
        roofline.main(["--shape", shape])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shape" in err and "N,H_s,H_t,V" in err


def test_an_existing_output_file_is_not_replaced(tmp_path, capsys):
    existing = tmp_path / "out.json"
    existing.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        roofline.main(["--shape", "64,16,32,500", "--json", str(existing)])
    assert exit_info.value.code == 2 and existing.read_text() == "mine"
    assert "--overwrite" in capsys.readouterr().err
