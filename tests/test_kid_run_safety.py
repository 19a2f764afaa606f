"""Nothing lost: atomic files and checkpoints, and ``kid train`` interrupted by SIGINT / SIGTERM in a real
subprocess whose stdout / stderr are a closed pipe (``kid train ... 2>&1 | tee log`` after Ctrl-C reached tee), a
file or a terminal: it saves a checkpoint and its report, says so, and exits 130 / 143."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from kid.files import atomic_directory, atomic_write_text
from kid.training import REPORT_NAME, RUN_STATE_NAME
from tests.kid_tiny import REPO, tiny_dataset, tiny_model, tiny_tokenizer, train_config
from tests.toy_spider import toy_spider as toy_spider_fixture
from tests.toy_spider import train_argv

toy_spider = toy_spider_fixture  # the module-scoped fixture


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


# ---- atomic files --------------------------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    os.chmod(path, 0o640)

    class Crash(Exception):
        pass

    def chunks():
        yield "new, half"
        raise Crash

    from kid.files import atomic_open

    with pytest.raises(Crash):
        with atomic_open(path) as f:
            for chunk in chunks():
                f.write(chunk)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o640  # permissions kept
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")

    target = tmp_path / "final"
    with atomic_directory(target) as staged:
        (staged / "a").write_text("1")
    with pytest.raises(Crash):
        with atomic_directory(target) as staged:
            (staged / "a").write_text("2")
            raise Crash
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["final",
                                                                                                 "report.json"]


def test_a_crash_while_saving_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    # transformers writes checkpoint-N in place: a crash in the middle used to leave a half-written newest
    # checkpoint, which --resume then picked.  Here the checkpoint of step 4 fails after its weights are written.
    import transformers

    from kid.config import MethodConfig
    from kid.training import run_training

    calls = []
    original = transformers.Trainer._save_rng_state

    def crash_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", crash_on_second_save)
    out = tmp_path / "run"
    method = MethodConfig(method="sft")

    def run(**kwargs):
        config = train_config(out, max_steps=4, save_steps=2, save_total_limit=5, **kwargs)
        return run_training(config, method, student=tiny_model(0), tokenizer=tiny_tokenizer(),
                            train_dataset=tiny_dataset(8, seed=2), write_final=True)

    with pytest.raises(OSError, match="simulated"):
        run()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no checkpoint-4, no staging, no final
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "checkpoint-2" / RUN_STATE_NAME).is_file()
    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", original)
    report = run(resume=True)
    assert report["global_steps"] == 4 and report["resumed_from"] == str((out / "checkpoint-2").resolve())
    assert [(s["first_step"], s["last_step"]) for s in report["segments"]] == [(0, 2), (2, 4)]
    assert (out / "final" / "config.json").is_file() and (out / "checkpoint-4").is_dir()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# ---- signals in a real subprocess ----------------------------------------------------------------------------------

def _env():
    env = dict(os.environ, KIDKERNELS_BACKEND="torch", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    env.pop("TRITON_INTERPRET", None)
    return env


def _read_until(fd, marker: bytes, timeout: float = 120.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {data[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty whose other side closed
                chunk = b""
            assert chunk, f"the output ended before {marker!r}: {data[-2000:]!r}"
            data += chunk
    return data


START = b"kid train: sft on "  # printed once the signal handlers are in place, just before training


def _check_saved(out, signame):
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "interrupted" and report["interrupted"] and report["signal"] == signame
    step = report["global_steps"]
    assert 1 <= step < report["max_steps"]
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / RUN_STATE_NAME).is_file()
    assert not (out / "final").exists()
    return report


@pytest.fixture
def children():
    """Processes started by a test: killed at its end if still running (a failed test leaves no 5000-step run)."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _argv(toy, out, *extra):
    # many steps: the run is stopped by the signal long before the end
    argv = train_argv(toy, out, "sft", "--save-steps", "100000", *extra)
    argv[argv.index("--max-steps") + 1] = "5000"
    return [sys.executable, "-m", "kid.cli", *argv]


def test_ctrl_c_with_both_streams_into_a_pipe_that_closed(toy_spider, tmp_path, children):
    # `kid train ... 2>&1 | tee log`, then Ctrl-C: tee dies too, and every later write fails with EPIPE.
    # Progress bars on: they write to the dead pipe on every step.
    out = tmp_path / "run"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(_argv(toy_spider, out, "--progress"), stdout=write_end, stderr=write_end,
                            env=_env(), cwd=tmp_path)
    children.append(proc)
    os.close(write_end)
    try:
        _read_until(read_end, START)
    finally:
        os.close(read_end)  # the reader is gone
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130
    _check_saved(out, "SIGINT")


def test_sigterm_with_stdout_into_a_closed_pipe_and_stderr_in_a_file(toy_spider, tmp_path, children):
    # only stdout piped (`kid train ... | head`): the checkpoint was saved, then a BrokenPipeError killed the run
    # before its report
    out = tmp_path / "run"
    log = tmp_path / "stderr.log"
    read_end, write_end = os.pipe()
    with open(log, "wb") as err:
        proc = subprocess.Popen(_argv(toy_spider, out), stdout=write_end, stderr=err, env=_env(), cwd=tmp_path)
    children.append(proc)
    os.close(write_end)
    os.close(read_end)  # nobody reads stdout at all
    deadline = time.monotonic() + 120
    while START not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 143, log.read_text()[-3000:]
    report = _check_saved(out, "SIGTERM")
    text = log.read_text()
    assert "kid: SIGTERM: saving a checkpoint after this step" in text
    assert f"kid train: sft interrupted by SIGTERM after step {report['global_steps']}" in text
    assert "--resume" in text and "Traceback" not in text


def test_ctrl_c_on_a_terminal(toy_spider, tmp_path, children):
    out = tmp_path / "run"
    master, slave = pty.openpty()
    with open(tmp_path / "stdout.log", "wb") as stdout:
        proc = subprocess.Popen(_argv(toy_spider, out), stdout=stdout, stderr=slave, env=_env(), cwd=tmp_path)
    children.append(proc)
    os.close(slave)
    try:
        _read_until(master, START)
        proc.send_signal(signal.SIGINT)
        said = _read_until(master, b"interrupted by SIGINT", timeout=180)
        assert proc.wait(timeout=180) == 130
    finally:
        os.close(master)
    report = _check_saved(out, "SIGINT")
    assert b"kid: SIGINT: saving a checkpoint" in said and b"Traceback" not in said
    assert report["segments"][0]["last_step"] == report["global_steps"]
