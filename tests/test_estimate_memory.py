"""The fake-tensor memory estimate (``benchmarks/estimate_memory.py``): the live-bytes tracker against hand counts,
a fake run against a real run of the same step on the CPU, the weights / gradients / optimizer state of a step
against a hand count from the model config, the loss's extra memory against its workspace budget, CUDA's op
choices, and the command line.  Tiny models only: each estimate takes about a second."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import estimate_memory
from benchmarks.estimate_memory import build_fake_models, estimate_step, main, paper_table_markdown
from benchmarks.fake_memory import LiveBytesTracker, allocated_bytes, cuda_like_execution
from benchmarks.model_presets import PRESETS
from benchmarks.train_step import StepPlan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def tiny_plan(**overrides) -> StepPlan:
    values = dict(student="tiny-qwen2", teacher="tiny-qwen2-teacher", method="rkd", batch_size=4,
                  micro_batch_size=2, seq_len=48, answer_len=16, lora_r=8, lora_alpha=16)
    values.update(overrides)
    return StepPlan(**values)


# ---- the tracker ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fake", [True, False], ids=["fake", "real"])
def test_tracker_counts_live_storages_by_hand(fake):
    mode = FakeTensorMode() if fake else None
    tracker = LiveBytesTracker()
    with mode or torch.device("cpu"):
        weight = torch.nn.Parameter(torch.empty(1000, 64))  # 256,000 bytes = 500 blocks of 512
    tracker.register([weight], "weights")
    with mode or torch.device("cpu"), tracker:
        x = torch.empty(300, 64)  # 76,800 bytes: 150 blocks
        y = x @ weight.t()  # [300, 1000] float32: 1,200,000 -> 1,200,128 bytes (2,344 blocks)
        z = y.relu()  # saved by relu's backward (its result)
        view = z[:10]  # a view: no new storage
        del y  # not saved by the graph (mm saves x): freed
        assert tracker.current == 256_000 + 76_800 + 1_200_128
        assert tracker.peak.bytes == 256_000 + 76_800 + 2 * 1_200_128
        assert tracker.peak.by_label == {"weights": 256_000, "activations": 76_800 + 2 * 1_200_128}
        del z
        assert tracker.current == 256_000 + 76_800 + 1_200_128  # the view keeps z's storage alive
        with tracker.region("loss workspace", "unit") as region:
            scratch = torch.empty(17)  # 68 bytes -> one 512-byte block
            del scratch
        assert (region.entry_bytes, region.extra_bytes) == (tracker.current, 512)
        view.sum().backward()
        assert weight.grad is not None
        tracker.relabel(weight.grad, "gradients")
        del view
    # After the backward: the weight, x (still referenced here) and the weight's gradient.
    assert tracker.live_by_label() == {"weights": 256_000, "activations": 76_800, "gradients": 256_000}
    assert allocated_bytes(0) == 0 and allocated_bytes(1) == 512 and allocated_bytes(512) == 512


def test_relabel_moves_bytes_of_the_peak_only_for_blocks_alive_at_the_peak():
    tracker = LiveBytesTracker()
    with FakeTensorMode(), tracker:
        a = torch.empty(256)  # 1,024 bytes, alive at the peak
        b = torch.empty(512)  # 2,048 bytes: the peak
        del b
        c = torch.empty(128)  # 512 bytes, allocated after the peak
        tracker.relabel(a, "gradients")
        tracker.relabel(c, "gradients")
    assert tracker.peak.bytes == 3_072
    assert tracker.peak.by_label == {"activations": 2_048, "gradients": 1_024}


def test_host_reads_other_than_kidkernels_input_checks_are_refused():
    from benchmarks.fake_memory import HostReadError

    with FakeTensorMode(), LiveBytesTracker():
        flag = torch.empty(3).sum() > 0
        with pytest.raises(HostReadError, match="read on the host"):
            bool(flag)


# ---- CUDA's op choices ------------------------------------------------------------------------------------------

class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_attention_takes_cuda_flash_attention_and_saves_only_log_sum_exps():
    batch, heads, length, dim = 2, 4, 256, 16
    with cuda_like_execution(("attention",)), FakeTensorMode():
        q, k, v = (torch.empty(batch, heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        tracker, names = LiveBytesTracker(), _OpNames()
        with tracker, names:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert "aten._scaled_dot_product_flash_attention" in names.names
    assert not any(n.endswith("_for_cpu") or "math" in n for n in names.names)
    # Live after the forward: the output and the float32 log-sum-exps saved for the backward, plus small RNG
    # state tensors; never a [T, T] score matrix.
    lse = batch * heads * length * 4
    assert out.dtype == torch.bfloat16
    assert out.numel() * 2 + lse <= tracker.current <= out.numel() * 2 + lse + 4 * 512
    assert tracker.largest[0] < length * length * 2


def test_dropout_keeps_a_bool_mask_as_on_cuda():
    n = 4096
    for routes, mask_bytes in ((("dropout",), n), ((), 2 * n)):  # CUDA: bool mask; CPU path: a bf16 mask
        with cuda_like_execution(routes), FakeTensorMode():
            x = torch.empty(n, dtype=torch.bfloat16, requires_grad=True)
            tracker = LiveBytesTracker()
            with tracker:
                y = F.dropout(x, 0.1, training=True)
            assert tracker.current == 2 * n + mask_bytes, routes
            del y


# ---- whole steps ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, options, implementation, lora, checkpointing", [
    ("sft", {}, "kidkernels", True, False),
    ("kid", {"strategy": "hard"}, "kidkernels", True, True),
    ("rkd", {}, "eager", False, False),
], ids=["sft-lora", "kid-hard-lora-ckpt", "rkd-eager-full"])
def test_fake_run_equals_a_real_run_on_the_cpu(monkeypatch, method, options, implementation, lora, checkpointing):
    """The same step on fake and on real CPU tensors, CPU op choices both (the mask skip answers for fake masks
    as the real run computes it): identical peaks, identical composition."""
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")
    plan = tiny_plan(method=method, method_options=options, implementation=implementation, lora=lora,
                     gradient_checkpointing=checkpointing, dtype="float32", teacher_dtype="float32")
    fake = estimate_step(plan, routes=("mask_skip",), fake=True)
    real = estimate_step(plan, routes=("mask_skip",), fake=False)
    assert fake["peak_bytes"] == real["peak_bytes"] > fake["weights_bytes"]
    assert fake["peak_by_label"] == real["peak_by_label"]
    assert fake["loss_extra_bytes"] == real["loss_extra_bytes"] > 0


def _qwen2_parameter_shapes(name: str) -> list[tuple[int, ...]]:
    c = PRESETS[name]
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    layer = [(h, h), (h,)] * 3 + [(h, h), (i, h), (i, h), (h, i), (h,), (h,)]  # q k v (+bias), o, mlp, two norms
    shapes = [(v, h)] + layer * c["num_hidden_layers"] + [(h,)]
    return shapes + ([] if c["tie_word_embeddings"] else [(v, h)])


def _lora_shapes(name: str, r: int) -> list[tuple[int, ...]]:
    c = PRESETS[name]
    h, i = c["hidden_size"], c["intermediate_size"]
    layer = [(r, h), (h, r)] * 4 + [(r, h), (i, r)] * 2 + [(r, i), (h, r)]  # q k v o, gate up, down
    return layer * c["num_hidden_layers"]


def _bytes(shapes, itemsize: int) -> int:
    return sum(allocated_bytes(torch.Size(s).numel() * itemsize) for s in shapes)


def test_weights_gradients_and_optimizer_state_at_the_peak_equal_a_hand_count():
    plan = tiny_plan(method="rkd")
    result = estimate_step(plan)
    models = build_fake_models(plan, FakeTensorMode())
    buffers = sum(allocated_bytes(b.numel() * b.element_size())
                  for m in (models.student, models.teacher) for b in m.buffers())
    lora = _lora_shapes("tiny-qwen2", plan.lora_r)
    weights = (_bytes(_qwen2_parameter_shapes("tiny-qwen2"), 2) + _bytes(lora, 4)
               + _bytes(_qwen2_parameter_shapes("tiny-qwen2-teacher"), 2) + buffers)
    assert result["weights_bytes"] == weights
    assert result["trainable_parameters"] == sum(torch.Size(s).numel() for s in lora)
    assert "micro-batch 2/2" in result["peak_where"]  # the gradients of micro-batch 1 exist
    by_label = result["peak_by_label"]
    assert by_label["weights"] == weights
    assert by_label["gradients"] == _bytes(lora, 4)
    # Fused AdamW: two float32 moments per LoRA tensor and a float32 step counter each (one 512-byte block).
    assert by_label["optimizer state"] == 2 * _bytes(lora, 4) + 512 * len(lora)


def test_rkd_peak_weights_and_saved_activations_equal_a_hand_count(tmp_path):
    """An independent count, from the config and autograd's rules, of the weights and of the activations live at
    the RKD step's peak, against the fake-tensor estimate.

    Student: Qwen2, hidden H=256, MLP width M=512, 2 layers of 4 heads (head dim 64), vocabulary 32,768 (tied),
    bf16, LoRA r=8 on every linear layer (float32 adapters, dropout 0: peft's Identity); teacher: hidden 128, MLP
    256, 2 layers, the same vocabulary (untied), bf16.  Micro-batch 2 x 512 tokens, the last 64 the answer.  The
    vocabulary makes the loss call's chunk buffers larger than any backward transient, so the peak is inside
    micro-batch 2's fused loss call: every activation of its student pass is still saved, and micro-batch 1's graph
    is gone.  Fake tensors allocate nothing: these shapes cost about a second.
    """
    student = dict(PRESETS["tiny-qwen2"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=32768)
    teacher = dict(PRESETS["tiny-qwen2-teacher"], vocab_size=32768)
    for name, config in (("student", student), ("teacher", teacher)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    B, T, A, r = 2, 512, 64, 8
    plan = StepPlan(student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"), method="rkd",
                    batch_size=2 * B, micro_batch_size=B, seq_len=T, answer_len=A, lora_r=r, lora_alpha=16,
                    lora_dropout=0.0)
    result = estimate_step(plan)
    assert "fused_linear_distill_loss" in result["peak_where"] and "micro-batch 2/2" in result["peak_where"]

    def block(nbytes):  # the CUDA caching allocator's 512-byte blocks
        return -(-nbytes // 512) * 512

    # ---- weights: every parameter in its own block, and the rotary embedding's two buffers (inv_freq and
    # original_inv_freq, head_dim / 2 float32 each).
    def base_weights(c, tied):
        h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
        layer = (3 * (block(2 * h * h) + block(2 * h))  # q, k, v with their biases (Qwen2)
                 + block(2 * h * h) + 2 * block(2 * i * h) + block(2 * h * i)  # o, gate, up, down
                 + 2 * block(2 * h))  # the two RMSNorm weights
        heads = block(2 * v * h) * (1 if tied else 2)
        return heads + layers * layer + block(2 * h) + 2 * block(4 * (h // c["num_attention_heads"]) // 2)

    H, M, L = student["hidden_size"], student["intermediate_size"], student["num_hidden_layers"]
    lora_in_out = [(H, H)] * 4 + [(H, M)] * 2 + [(M, H)]  # q k v o, gate up, down: (in, out)
    lora = L * sum(block(4 * r * fan_in) + block(4 * fan_out * r) for fan_in, fan_out in lora_in_out)
    weights = base_weights(student, True) + lora + base_weights(teacher, False)
    assert result["weights_bytes"] == result["peak_by_label"]["weights"] == weights

    # ---- activations saved by the student pass of micro-batch 2 (N = B T tokens), by what saves them:
    N, heads = B * T, student["num_attention_heads"]
    head_dim = H // heads
    per_layer = (
        6 * N * H * 4 + N * M * 4  # LoRA casts its input to float32 for lora_A, saved for A's weight gradient
                                   # (q, k, v, o, gate, up read H features, down reads M), one copy per adapter
        + 7 * N * r * 4            # lora_A's float32 output, saved for lora_B's weight gradient
        + 3 * N * H * 2            # flash attention saves q and k after RoPE (new tensors) and v (v_proj's output)
        + N * H * 2                # ... and its output
        + B * heads * T * 4        # ... and its float32 log-sum-exp, [B, heads, T]
        + 2 * 512                  # ... and its two RNG-state tensors (one block each)
        + 2 * (N * H * 4 + N * 4)  # RMSNorm (input, post-attention): its float32 input (pow, mul) and rsqrt
        + N * M * 2                # SiLU saves the gate projection's output
        + 2 * N * M * 2            # act(gate) * up saves both factors
    )
    # Layer 1's input norm saves nothing: nothing before the first LoRA adapter requires a gradient.
    first_norm = N * H * 4 + N * 4
    rope = 2 * T * head_dim * 2            # cos and sin, [1, T, head_dim] bf16, shared by the layers
    final_norm = N * H * 4 + N * 4         # the final RMSNorm, as the layers' norms
    gather_input = N * H * 2               # gather (the answer rows) saves its input: the last hidden state
    rows = B * A * H * 2 + B * A * teacher["hidden_size"] * 2  # the student's and the teacher's answer rows
    batches = 2 * 2 * B * T * 8            # the step's input ids and attention masks (int64), both micro-batches
    activations = L * per_layer - first_norm + rope + final_norm + gather_input + rows + batches
    # Left out of the hand count: the answer positions and labels ([B, A] int64) and the scalars of the step
    # (token counts, normalisers): a dozen blocks of 512 or 1,024 bytes, under 8 KiB, less than any term above.
    estimated = result["peak_by_label"]["activations"]
    assert activations <= estimated <= activations + 8 * 1024, (estimated, activations)


@pytest.mark.parametrize("method", ["rkd", "sft", "kid"])
def test_the_loss_extra_memory_stays_within_the_workspace(method):
    """Each kidkernels loss call's extra memory is its chunk buffers (at most ``workspace_bytes``) plus its O(N)
    outputs: the input gradient formed in the forward pass and per-row statistics; the eager loss's is more than
    one float32 [N, V] logits tensor."""
    workspace = 32 << 10  # a quarter of one float32 [N, V] logits tensor here
    plan = tiny_plan(method=method, workspace_bytes=workspace)
    ours = estimate_step(plan)
    eager = estimate_step(tiny_plan(method=method, workspace_bytes=workspace, implementation="eager"))
    rows = plan.micro_batch_size * plan.answer_len
    hidden, vocab = PRESETS["tiny-qwen2"]["hidden_size"], PRESETS["tiny-qwen2"]["vocab_size"]
    outputs = allocated_bytes(rows * hidden * 2) + allocated_bytes(16 * 4 * rows) + 8 * 512
    assert ours["loss_calls"] >= plan.micro_batches
    assert workspace // 2 < ours["loss_extra_bytes"] <= workspace + outputs
    # No loss or selection buffer is larger than the workspace, and no tensor of the step is a float32 [N, V].
    largest = ours["largest_tensor_bytes_by_label"]
    assert max(largest.get("loss workspace", 0), largest.get("selection workspace", 0)) <= workspace
    assert ours["largest_tensor_bytes"] < 4 * rows * vocab
    assert eager["loss_extra_bytes"] > 4 * rows * vocab
    assert ours["peak_bytes"] < eager["peak_bytes"]


def test_on_policy_generation_and_full_fine_tuning_are_estimated():
    gkd = estimate_step(tiny_plan(method="gkd"))
    assert gkd["peak_bytes"] > gkd["weights_bytes"]
    assert gkd["plan"]["method_config"]["gkd_lambda"] == 1.0  # the generated batch: the worst case
    full = estimate_step(tiny_plan(method="sft", lora=False))
    params = sum(torch.Size(s).numel() for s in _qwen2_parameter_shapes("tiny-qwen2"))
    assert full["trainable_parameters"] == params
    assert full["peak_by_label"]["optimizer state"] >= 2 * 4 * params  # float32 master weights' moments


# ---- command line and table -------------------------------------------------------------------------------------

TINY_ARGS = ["--student", "tiny-qwen2", "--teacher", "tiny-qwen2-teacher", "--batch-size", "4",
             "--micro-batch-size", "2", "--seq-len", "48", "--answer-len", "16", "--lora-r", "8"]


def test_command_line_prints_both_estimates_and_writes_json(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    assert main(TINY_ARGS + ["--method", "kid", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ESTIMATE" in text and "not a measurement" in text and "Not modelled:" in text
    assert "with kidkernels: ESTIMATED peak" in text and "without this library" in text
    payload = json.loads(out.read_text())
    assert {r["plan"]["implementation"] for r in payload["results"]} == {"kidkernels", "eager"}
    with pytest.raises(SystemExit) as refused:  # nothing is overwritten unless asked
        main(TINY_ARGS + ["--json", str(out)])
    assert refused.value.code == 2


@pytest.mark.parametrize("bad, message", [
    (["--student", "no-such-model"], "no-such-model"), (["--micro-batch-size", "3"], "not a multiple"),
    (["--seq-len", "16"], "answer_len 16 must be below seq_len 16"), (["--lora-r", "0"], "lora_r must be >= 1"),
    (["--lora-dropout", "2"], "lora_dropout must be in [0, 1)"), (["--lora-alpha", "0"], "lora_alpha must be > 0"),
    (["--workspace-mb", "-5"], "--workspace-mb must be a positive"),
    (["--workspace-mb", "0"], "--workspace-mb must be a positive"),
    (["--workspace-mb", "inf"], "--workspace-mb must be a positive"),
    (["--json", "{tmp}/no-such-folder/estimate.json"], "does not exist"),
    (["--json", "{tmp}"], "is a directory"),
    (["--paper-table", "--results-dir", "{tmp}/results", "--readme", "{tmp}/no-markers.md"], "has no <!-- estimate"),
    (["--paper-table", "--results-dir", "{tmp}/no-markers.md", "--no-readme"], "is not a folder"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v).replace("{tmp}", ""))
def test_command_line_mistakes_are_one_line_exit_2_before_any_estimate(bad, message, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a mistake must be found before any estimate runs")

    monkeypatch.setattr(estimate_memory, "estimate_step", refuse)
    (tmp_path / "no-markers.md").write_text("# a README without the estimate block\n")
    with pytest.raises(SystemExit) as error:
        main(TINY_ARGS + [a.replace("{tmp}", str(tmp_path)) for a in bad])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-markers.md"]  # nothing written


def test_paper_table_renders_between_markers(tmp_path):
    results = [estimate_step(tiny_plan(method="kid", implementation=impl, micro_batch_size=micro))
               for impl in ("kidkernels", "eager") for micro in (2, 4)]
    table = paper_table_markdown(results, source="unit.json")
    assert "Estimates, not measurements" in table
    assert table.count("| kid | ") == 2 and "| kid | 2 | off |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{estimate_memory.START_MARKER}\nold\n{estimate_memory.END_MARKER}\nend\n")
    estimate_memory.write_between_markers(readme, table)
    text = readme.read_text()
    assert "old" not in text and "| kid | 4 | off |" in text and text.endswith(f"{estimate_memory.END_MARKER}\nend\n")
    saved = tmp_path / "estimate.json"
    saved.write_text(json.dumps({"kind": "estimate", "results": results}))
    readme.write_text(f"{estimate_memory.START_MARKER}\n{estimate_memory.END_MARKER}\n")
    assert main(["--render-table", str(saved), "--readme", str(readme)]) == 0
    assert readme.read_text().count("| kid | ") == 2


# ---- the trainer's step and its eager twin ----------------------------------------------------------------------

def _one_graph_step(ctx, batch, counts, kd_plan, recorder, forward_context):
    """The micro-batch with every term in one graph and one backward (what the trainer did before issue 14)."""
    from kid.methods import compute_objective

    with forward_context():
        loss = compute_objective(ctx, batch, counts.normalizer, kd_normalizer=counts.kd_normalizer,
                                 num_sequences=counts.num_sequences, kd_plan=kd_plan).loss
    loss.backward()


def test_two_pass_methods_hold_one_student_graph_at_a_time(monkeypatch):
    """GKD on a generated batch with its MLE term is two student passes: back-propagated one at a time (the
    trainer's step) they keep the activations of one pass, as RKD's single pass does; in one graph, of two."""
    gkd = estimate_step(tiny_plan(method="gkd"))
    rkd = estimate_step(tiny_plan(method="rkd"))
    from benchmarks import train_step

    monkeypatch.setitem(train_step.MICRO_BATCH_STEPS, "kidkernels", _one_graph_step)
    both = estimate_step(tiny_plan(method="gkd"))
    assert gkd["plan"]["method_config"]["mle_weight"] == 1.0 and gkd["loss_calls"] == 4  # 2 micro-batches x 2 terms
    # What a step holds beyond its weights, optimizer state and gradients at its peak: activations, plus the loss's
    # workspace when the peak falls inside the loss (with the GEMM-fused loss GKD's does: its float32 teacher tile
    # and gradient chunk are alive next to one pass's activations, while RKD's peak is before its loss call).
    def transient(r):
        return r["peak_by_label"]["activations"] + r["peak_by_label"].get("loss workspace", 0)

    one, two, single = (transient(r) for r in (gkd, both, rkd))
    assert one < 0.7 * two
    assert abs(one - single) < 0.1 * single  # the prompts, answers and generated batch are small
    assert gkd["peak_bytes"] < both["peak_bytes"]


def test_generation_runs_once_per_step_in_the_configured_calls():
    """The rollout goes through kid.rollout (its generate_grouped stood in for): all the step's prompts before the
    first micro-batch, in calls of at most generation_batch_size."""
    assert estimate_step(tiny_plan(method="gkd"))["generate_calls"] == 1
    assert estimate_step(tiny_plan(method="imitkd", method_options={"generation_batch_size": 1}))[
        "generate_calls"] == 4
    assert estimate_step(tiny_plan(method="fdistill", method_options={"generation_batch_size": 3}))[
        "generate_calls"] == 2
    assert estimate_step(tiny_plan(method="rkd"))["generate_calls"] == 0


def _padded_teacher(tmp_path, rows: int = 520) -> str:
    """tiny-qwen2-teacher with a padded head (``rows`` > the student's 512, as Qwen1.5-14B's 152,064 against
    Qwen1.5-0.5B's 151,936), as a config path."""
    path = tmp_path / "padded-teacher" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(dict(PRESETS["tiny-qwen2-teacher"], vocab_size=rows)))
    return str(path.parent)


@pytest.mark.parametrize("method, options, padded", [
    ("sft", {}, False), ("rkd", {}, False), ("kid", {"mle_input": "gold"}, False),
    ("gkd", {"max_new_tokens": 5}, False),
    ("imitkd", {"imitkd_gold_probability": 0.5, "max_new_tokens": 5}, False),
    ("rkd", {}, True), ("kid", {"strategy": "hard"}, True)],
    ids=["sft", "rkd", "kid-gold", "gkd", "imitkd", "rkd-padded-teacher", "kid-hard-padded-teacher"])
def test_the_eager_twin_is_the_trainers_step(monkeypatch, tmp_path, method, options, padded):
    """On real CPU tensors (float32, tiny random models), the eager twin of a micro-batch computes the loss and
    the LoRA gradients of the trainer's step: same passes, same data (the same rollout), same normalisers (the
    generated answers shorter than the gold ones: the KD term has its own token count)."""
    from benchmarks.measure_step import build_models
    from benchmarks.train_step import (
        Recorder,
        eager_micro_batch_step,
        make_batches,
        micro_batch_step,
        objective_context,
        step_counts,
        trainable_parameters,
    )
    from kid.rollout import rollout_step

    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")
    plan = tiny_plan(method=method, method_options=options, dtype="float32", teacher_dtype="float32",
                     lora_dropout=0.0, seq_len=24, answer_len=8,
                     **({"teacher": _padded_teacher(tmp_path)} if padded else {}))
    torch.manual_seed(0)
    models = build_models(plan, "cpu")
    # The trainer's rule (DistillTrainer.__init__): heads of different sizes share their first rows.
    assert objective_context(plan, models, 0, "cpu").shared_vocab == (512 if padded else None)
    with torch.no_grad():  # LoRA's B starts at zero (A's gradient would be zero): give both a spread
        for param in trainable_parameters(models.student):
            param.normal_(0.0, 0.5)
    batches = make_batches(plan, models.vocab_size, "cpu")
    rollout = None
    if plan.method_config().generates:
        rollout = rollout_step(objective_context(plan, models, 0, "cpu"), batches, seed=3)
    counts = step_counts(plan, batches, rollout)
    if rollout is not None:
        kd = sum((b["answer_labels"] if p.kd_batch is None else p.kd_batch["answer_labels"]).ne(-100).sum()
                 for b, p in zip(batches, rollout.plans))
        assert counts.kd_normalizer == int(kd) < counts.normalizer  # the trainer's count, read from the batches
    results = []
    for step in (micro_batch_step, eager_micro_batch_step):
        models.student.zero_grad(set_to_none=True)
        for index, batch in enumerate(batches):
            parts = step(objective_context(plan, models, index, "cpu"), batch, counts,
                         rollout.plans[index] if rollout is not None else None, Recorder())
            assert parts.loss.grad_fn is None  # back-propagated term by term
        results.append((parts.loss, [p.grad.clone() for p in trainable_parameters(models.student)]))
    (ours, our_grads), (eager, eager_grads) = results
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in our_grads)
    for a, b in zip(our_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    if rollout is not None:
        assert any(p.kd_batch is not None for p in rollout.plans)  # a generated batch took the two-pass path


def test_a_padded_teacher_head_is_estimated_on_the_shared_vocabulary(tmp_path):
    """Teacher and student heads of different sizes: the step runs on the rows both have, as the trainer runs it
    (``shared_vocab``); the teacher's whole head is still counted in its weights."""
    plan = tiny_plan(method="kid", teacher=_padded_teacher(tmp_path, rows=640))
    models = build_fake_models(plan, FakeTensorMode())
    assert (models.vocab_size, models.shared_vocab) == (512, 512)
    equal = estimate_step(tiny_plan(method="kid"))
    padded = estimate_step(plan)
    head = PRESETS["tiny-qwen2-teacher"]["hidden_size"]
    extra = (allocated_bytes(640 * head * 2) - allocated_bytes(512 * head * 2)) * 2  # embedding and lm_head rows
    assert padded["weights_bytes"] - equal["weights_bytes"] == extra
    eager = estimate_step(tiny_plan(method="kid", implementation="eager", teacher=plan.teacher))
    assert padded["peak_bytes"] < eager["peak_bytes"]


# ---- SFT holds no teacher -----------------------------------------------------------------------------------------

def test_sft_holds_no_teacher_in_the_estimate_nor_in_the_measurement():
    """``kid train`` loads no teacher for SFT: the estimate counts the student alone, and the GPU measurement
    builds no teacher for SFT-only configurations and moves a built one out of device memory for SFT."""
    from benchmarks.measure_step import build_models, models_for

    sft = tiny_plan(method="sft")
    result = estimate_step(sft)
    student = (_bytes(_qwen2_parameter_shapes("tiny-qwen2"), 2) + _bytes(_lora_shapes("tiny-qwen2", sft.lora_r), 4))
    buffers = sum(allocated_bytes(b.numel() * b.element_size())
                  for b in build_fake_models(sft, FakeTensorMode()).student.buffers())
    assert result["weights_bytes"] == result["peak_by_label"]["weights"] == student + buffers
    only_sft = build_models([sft], "cpu")
    assert only_sft.teacher is None and only_sft.vocab_size == PRESETS["tiny-qwen2"]["vocab_size"]
    both = build_models([sft, tiny_plan(method="rkd")], "cpu")
    assert both.teacher is not None
    assert models_for(sft, both, "cpu").teacher is None  # on a GPU: moved to host memory meanwhile
    assert models_for(tiny_plan(method="rkd"), both, "cpu").teacher is both.teacher
    with pytest.raises(ValueError, match="needs a teacher"):
        models_for(tiny_plan(method="rkd"), only_sft, "cpu")


@pytest.mark.parametrize("bad, message", [(["--configs", "kid-mb4,nope"], "unknown configs"),
                                          (["--json", "{tmp}/missing/step.json"], "does not exist"),
                                          (["--json", "{tmp}/step.json"], "pass --overwrite")])
def test_measure_step_mistakes_are_one_line_exit_2_before_the_gpu_check(bad, message, tmp_path, capsys):
    from benchmarks import measure_step

    (tmp_path / "step.json").write_text("{}")
    with pytest.raises(SystemExit) as error:
        measure_step.main([a.replace("{tmp}", str(tmp_path)) for a in bad])
    err = capsys.readouterr().err
    assert error.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert (tmp_path / "step.json").read_text() == "{}"
