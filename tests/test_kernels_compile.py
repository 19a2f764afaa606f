"""tools/compile_kernels.py compiles the kernels as kidkernels launches them, for Hopper, on a machine without a GPU,
and fails when a hot variant spills.

The interpreter that runs the kernels on CPU tensors accepts code the compiler rejects, and says nothing about
registers; the tool records the launches of the public ops, compiles each distinct specialisation to a cubin and
reads its resources.  Here: the quick set (the bfloat16 training step at V = 151,936, about 20 s of CPU), the
specialisation it records, its agreement with the tool's own rules, and the spill check on a synthetic result and on
a real cubin that spills.  ``python tools/compile_kernels.py`` compiles every variant (minutes).
"""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compile_kernels.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _env():
    # The tool needs compiled (not interpreted) kernels: a fresh process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _tool_module():
    name = "compile_kernels_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)  # imports nothing but the standard library at module level
    return sys.modules[name]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "quick.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--arch", "90", "--json", str(out), "-q"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_quick_compile_prints_resources_of_every_launched_variant(quick_run):
    proc, report = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report is not None and report["arch"] == 90 and report["problems"] == []
    variants = report["variants"]
    assert len(variants) >= 4
    for v in variants:
        assert v["error"] is None, v
        assert v["hot"], v  # --quick runs the hot training step only
        assert 0 < v["regs"] <= 255 and v["spill_bytes"] == 0 and v["spill_instructions"] == 0, v
        assert v["smem_bytes"] >= v["dynamic_shared_bytes"] >= 0
        assert v["num_warps"] >= 1 and v["scenarios"]
    header = proc.stdout.splitlines()[0].split()
    assert header[:3] == ["kernel", "variant", "warps"] and "regs" in header and "SMEM" in header
    for v in variants:  # one table row per variant, with its registers
        assert any(line.startswith(v["kernel"]) and f" {v['regs']} " in line for line in proc.stdout.splitlines())
    assert f"compiled {len(variants)} of {len(variants)} kernel variants" in proc.stdout
    # Every public op of the training step launched something, and the entropy and argmax kernels are distinct
    # launches from the loss kernels.
    scenarios = {s for v in variants for s in v["scenarios"]}
    assert scenarios == set(report["scenarios"])


def test_variants_carry_the_specialisation_of_a_launch(quick_run):
    """What the JIT would compile on a GPU: aligned pointers and sizes divisible by 16 carry the divisibility hint,
    sizes that fit are i32 (an i64 would change the address arithmetic), the hot dtype pair is compiled, and a chunk
    that starts off a 16-byte boundary is its own variant."""
    _, report = quick_run
    assert report is not None
    variants = report["variants"]
    aligned_call = report["scenarios"][0]  # 32 rows in one chunk: every buffer starts 16-byte aligned
    assert "rows=" not in aligned_call
    checked_ints = 0
    for v in variants:
        sig, div = v["signature"], set(v["divisible_by_16"])
        for name, value in v["example_ints"].items():
            if value == 1:
                assert sig[name] == "constexpr", (v["kernel"], name)
            elif -2 ** 31 <= value < 2 ** 31:
                assert sig[name] == "i32", (v["kernel"], name, sig[name])
                assert (name in div) == (value % 16 == 0), (v["kernel"], name, value)
                checked_ints += 1
        if aligned_call in v["scenarios"]:
            pointers = [n for n, t in sig.items() if t.startswith("*")]
            assert pointers and set(pointers) <= div, (v["kernel"], set(pointers) - div)
    assert checked_ints > 0
    vocab_args = [(v["kernel"], n) for v in variants for n, x in v["example_ints"].items() if x == 151_936]
    assert vocab_args and all(n in next(v for v in variants if v["kernel"] == k)["divisible_by_16"]
                              for k, n in vocab_args)
    # float32 logits in, bfloat16 gradient out: one kernel reads float32 and writes bfloat16.
    assert any({"*fp32", "*bf16"} <= set(v["signature"].values()) for v in variants if v["hot"])
    # The chunks of the one-row-per-chunk call start at every alignment: some launch has an unaligned pointer.
    assert any(t.startswith("*") and n not in v["divisible_by_16"]
               for v in variants for n, t in v["signature"].items())


RECORD_SCRIPT = """
import sys
sys.path.insert(0, {tools!r})
import compile_kernels as ck
ck.prepare_process()
import torch
import triton
import triton.language as tl

pairs = []


def both(kernel, args, kwargs, arch):
    ref = ck.specialize_with_triton(kernel, args, kwargs, arch)
    pairs.append((kernel.fn.__name__, ref, ck.specialize_fallback(kernel, args, kwargs, arch)))
    return ref


ck.record(ck.scenarios(quick=True), 90, specializer=both)
norm = lambda attrs: {{k: v for k, v in attrs.items() if v}}
for name, ref, alt in pairs:
    assert ref.signature == alt.signature, (name, ref.signature, alt.signature)
    assert ref.constexprs == alt.constexprs, (name, ref.constexprs, alt.constexprs)
    assert norm(ref.attrs) == norm(alt.attrs), (name, ref.attrs, alt.attrs)
    assert vars(ref.options) == vars(alt.options), name
print("compared", len(pairs), "launches")


# An autotuned kernel: every config is a variant (each is compiled at the first launch, to be benchmarked).
@triton.autotune(configs=[triton.Config({{"BLOCK": 64}}, num_warps=1), triton.Config({{"BLOCK": 128}}, num_warps=4)],
                 key=["n"])
@triton.jit
def toy_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


recorder = ck.Recorder(90)
x = torch.empty(4096)
with ck.recording(recorder):
    toy_copy[(1,)](x, x[3:], 4093)
got = sorted((v.num_warps, v.constexpr_values()["BLOCK"], tuple(v.divisible())) for v in recorder.variants.values())
assert got == [(1, 64, ("x_ptr",)), (4, 128, ("x_ptr",))], got
print("autotune ok")
"""


def test_fallback_rules_agree_with_tritons_binder_and_autotune_configs_are_recorded(tmp_path):
    """The tool's written-out specialisation rules (used if Triton's binder internals move) give the same
    signature, constants, hints and options as Triton's own binder on every quick launch; an autotuned kernel
    yields one variant per config, with an unaligned view and an odd size left without the hint."""
    script = tmp_path / "record_check.py"  # Triton reads a kernel's source from its file
    script.write_text(RECORD_SCRIPT.format(tools=str(TOOL.parent)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-2].startswith("compared") and int(lines[-2].split()[1]) > 0 and lines[-1] == "autotune ok"


def _result(tool, *, hot, spill_bytes=0, spill_instructions=0, error=None):
    variant = types.SimpleNamespace(name="k", hot=hot, num_warps=8, describe=lambda: "fp32 BLOCK_V=4096")
    res = None if error else tool.Resources(regs=255, stack=spill_bytes, local=0, static_shared=0,
                                            dynamic_shared=0, spill_instructions=spill_instructions)
    return tool.Result(variant, res, error=error)


def test_check_fails_when_a_hot_variant_spills():
    tool = _tool_module()
    clean, hot_spill = _result(tool, hot=True), _result(tool, hot=True, spill_bytes=96, spill_instructions=12)
    cold_spill = _result(tool, hot=False, spill_bytes=96, spill_instructions=12)
    assert tool.check([clean, cold_spill]) == []
    [problem] = tool.check([clean, hot_spill, cold_spill])
    assert "hot variant spills" in problem and "96 B" in problem
    assert len(tool.check([clean, hot_spill, cold_spill], "any")) == 2
    assert tool.check([hot_spill], "none") == []
    assert tool.check([_result(tool, hot=True, spill_instructions=3)])  # spill code without a stack frame counts
    assert "compile failed" in tool.check([_result(tool, hot=False, error="CompilationError: x")], "none")[0]


# A [ROWS, COLS] float32 tile kept live across two row reductions: at 128 x 128 with one warp that is 512 values per
# thread, past the 255-register limit, so ptxas spills; at 16 x 128 it fits.  Run in a fresh process (as the tool
# is): this one runs Triton under the interpreter, whose language functions do not compile.
SPILL_SCRIPT = """
import json, sys, types
sys.path.insert(0, {tools!r})
import compile_kernels as ck
ck.prepare_process()
import torch
import triton
import triton.language as tl


@triton.jit
def toy_row_normalise(x_ptr, y_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + r * COLS + c)
    scale = tl.sum(x * x, axis=1)[:, None]
    peak = tl.max(x, axis=1)[:, None]
    tl.store(y_ptr + r * COLS + c, (x - peak) / scale)


x, y = torch.empty(128 * 128), torch.empty(128 * 128)
results = []
for rows in (16, 128):
    launch = ck.specialize(toy_row_normalise, (x, y), dict(ROWS=rows, COLS=128, num_warps=1), 90)
    assert launch.signature == dict(x_ptr="*fp32", y_ptr="*fp32", ROWS="constexpr", COLS="constexpr"), launch
    compiled = ck.compile_variant(toy_row_normalise, launch, 90)
    res = ck.read_resources(compiled.asm["cubin"], compiled.metadata.name, compiled.metadata.shared)
    variant = types.SimpleNamespace(name=f"toy{{rows}}", hot=True, num_warps=1, describe=lambda: "toy")
    results.append(ck.Result(variant, res))
print(json.dumps(dict(resources=[vars(r.resources) for r in results], problems=ck.check(results))))
"""


def test_a_spilling_kernel_is_caught_from_its_cubin(tmp_path):
    """The whole path on a real cubin: specialise a launch, compile, read cuobjdump's resource usage; the tile that
    cannot fit in registers spills and fails the check, the small one does not."""
    script = tmp_path / "toy_spill.py"  # Triton reads a kernel's source from its file
    script.write_text(SPILL_SCRIPT.format(tools=str(TOOL.parent)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    small, big = out["resources"]
    assert small["regs"] > 0 and small["stack"] == small["local"] == small["spill_instructions"] == 0
    assert big["stack"] + big["local"] > 0 and big["spill_instructions"] > 0
    [problem] = out["problems"]
    assert problem.startswith("hot variant spills: toy128")


def test_parse_res_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function distill_grad_kernel:\n"
            "  REG:42 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    usage = _tool_module().parse_res_usage(text)
    assert usage == {"distill_grad_kernel": {"REG": 42, "STACK": 16, "SHARED": 1024, "LOCAL": 8, "CONSTANT[0]": 664,
                                             "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}


def test_bad_arch_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(TOOL), "--arch", "9"], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--arch" in proc.stderr
