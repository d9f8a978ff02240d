"""Interrupted and failing writes (issue 8): never a partial file under the final name.

``python -m lycoris_core bake`` and ``merge`` run as child processes and are stopped
after they have started writing (SIGKILL, SIGTERM, SIGINT), or run against a full
disk (a file-size rlimit with SIGXFSZ ignored, or a tiny tmpfs when mounting works).
After each: the final output name is absent, the source files hash as before, and
after a clean error (full disk, SIGINT, SIGTERM: the CLI unwinds on both) no
``*.partial`` temp file is left.  A SIGKILL can leave the temp file: it is named
``.<output>.<random>.partial``, never the output's name, and a rerun succeeds.

To stop a child *while* it writes, whatever the machine's load, the child runs the real
CLI (``runpy`` of ``lycoris_core.__main__``) with one hook: in the main thread, in the
middle of the write (bake: after patching the first tensor, with the reader and writer
threads running and the temp file open; merge: after the temp file is written, before
the rename), it creates a marker file and waits there until the test's signal arrives.
The test signals only once the marker exists, so the stop always lands mid-write.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_util import LONG, sha256, tally
from safetensors.torch import save_file

from lycoris_core.adapter import load_adapter
from lycoris_core.keymap import map_adapter, state_shapes
from lycoris_core.testing.synthetic import synthetic_adapter

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, time, runpy
hold = os.environ.get("RELIABILITY_HOLD")
if hold:
    import lycoris_core.io.writer as writer, lycoris_core.tools.bake as bake

    def held():
        open(hold, "w").close()  # the test signals once it sees this
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.01)
        sys.exit(3)  # no signal came: the test fails on the exit code

    save, patch = writer.save_file, bake.patched_value

    def save_then_hold(*args, **kwargs):
        save(*args, **kwargs)
        held()

    def patch_then_hold(*args, **kwargs):
        patch(*args, **kwargs)
        held()

    writer.save_file, bake.patched_value = save_then_hold, patch_then_hold
sys.argv = ["lycoris_core", *sys.argv[1:]]
runpy.run_module("lycoris_core", run_name="__main__", alter_sys=True)
"""


def _small(spec) -> bool:
    if spec.part == "unet":
        return spec.name.startswith("down_blocks.1.attentions.0.") and len(spec.weight) > 1
    return spec.name.startswith("text_model.encoder.layers.1.") and len(spec.weight) > 1


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two real-name adapters and an SD1.5 checkpoint slice holding what they touch (and more)."""
    folder = tmp_path_factory.mktemp("sources")
    lora = folder / "lora.safetensors"
    loha = folder / "loha.safetensors"
    save_file(synthetic_adapter("sd1", "lora", select=_small, rank=8, seed=1), str(lora))
    save_file(synthetic_adapter("sd1", "loha", select=_small, rank=4, seed=2), str(loha))
    full = state_shapes("sd1", "checkpoint")
    wanted = set()
    report = map_adapter(load_adapter(str(lora)).modules, full, allow_partial=True)
    for target in report.targets.values():
        wanted.add(target.weight_key)
    # untouched tensors too (a bake copies them): the rest of the same blocks
    wanted |= {k for k in full if ".input_blocks.4." in k or "encoder.layers.1." in k}
    gen = torch.Generator().manual_seed(0)
    ckpt = folder / "ckpt.safetensors"
    save_file({k: (torch.randn(full[k], generator=gen) * 0.02).half() for k in sorted(wanted)}, str(ckpt),
              metadata={"modelspec.architecture": "stable-diffusion-v1"})
    files = {"lora": lora, "loha": loha, "ckpt": ckpt}
    return files, {name: sha256(p) for name, p in files.items()}


def command(kind: str, files: dict, out: Path) -> list[str]:
    if kind == "bake":
        return ["bake", str(files["ckpt"]), "-a", f"{files['lora']}@0.8", "-a", str(files["loha"]), "-o", str(out)]
    return ["merge", "-a", f"{files['lora']}@0.8", "-a", str(files["loha"]), "--rank", "8", "-o", str(out)]


def start(args: list[str], hold: Path | None = None, preexec=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               RELIABILITY_HOLD=str(hold or ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def wait_until_held(proc: subprocess.Popen, marker: Path, kind: str) -> None:
    """Wait (however long the machine takes) until the child holds in the middle of its write."""
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"{kind} ended before it held: {proc.returncode} {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.01)


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.partial"))


def check_sources(sources_) -> None:
    files, hashes = sources_
    assert {name: sha256(p) for name, p in files.items()} == hashes, "a source file changed"


KILLS = [("bake", signal.SIGKILL), ("merge", signal.SIGINT), ("bake", signal.SIGTERM)]
if LONG:
    KILLS += [("bake", signal.SIGINT), ("merge", signal.SIGKILL), ("merge", signal.SIGTERM)]


@pytest.mark.parametrize("kind,sig", KILLS, ids=[f"{k}-{s.name}" for k, s in KILLS])
def test_killed_while_writing_leaves_no_output_and_sources_untouched(tmp_path, sources, kind, sig):
    files, _ = sources
    out = tmp_path / "out.safetensors"
    proc = start(command(kind, files, out), hold=tmp_path / "held")
    try:
        wait_until_held(proc, tmp_path / "held", kind)
        found = [p for p in partials(tmp_path) if p.stat().st_size > 0]
        assert found, "the child holds mid-write, so its temp file exists and holds bytes"
        written = found[0].stat().st_size
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t = tally("writes")
    t.add(f"{kind} stopped by {sig.name}")
    assert proc.returncode != 0
    assert not out.exists(), "a partial output exists under the final name"
    check_sources(sources)
    left = partials(tmp_path)
    if sig == signal.SIGINT:  # KeyboardInterrupt unwinds through atomic_path, which removes its temp
        assert not left, left
    elif sig == signal.SIGTERM:  # the CLI turns SIGTERM into the same unwinding
        t.add(f".partial left after {sig.name}", len(left))
        assert not left, left
    else:  # SIGKILL ends the process at once
        t.add(f".partial left after {sig.name}", len(left))
        assert all(p.name.startswith(".out.safetensors.") for p in left)
    t.peak("bytes written before the stop", written)
    if sig == signal.SIGKILL and (LONG or kind == "bake"):  # a rerun is not blocked by the stale temp file
        rerun = start(command(kind, files, out))
        _o, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err[-2000:]
        assert load_adapter(str(out)).modules if kind == "merge" else out.stat().st_size > written
        t.add("reruns after SIGKILL succeeded")


@pytest.mark.skipif(not LONG, reason="one more child process: long run only (LYCORIS_LONG=1)")
def test_sigterm_cleans_up_its_temp_file(tmp_path, sources):
    files, _ = sources
    out = tmp_path / "out.safetensors"
    proc = start(command("merge", files, out), hold=tmp_path / "held")
    try:
        wait_until_held(proc, tmp_path / "held", "merge")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    assert not partials(tmp_path)


def _fsize_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def assert_clean_error(proc, out: Path, folder: Path) -> str:
    _o, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    assert not out.exists()
    assert not partials(folder), partials(folder)
    return lines[0]


FULL_DISK = ["bake", "merge", "demo"] if LONG else ["bake", "merge"]


@pytest.mark.parametrize("kind", FULL_DISK)
def test_full_disk_rlimit_gives_one_error_line_and_no_partial_file(tmp_path, sources, kind):
    files, _ = sources
    out = tmp_path / "out.safetensors"
    if kind == "demo":
        args, out = ["demo", str(tmp_path / "demo")], tmp_path / "demo" / "demo_lora.safetensors"
        (tmp_path / "demo").mkdir()
        folder, limit = tmp_path / "demo", 64 * 1024
    else:
        args, folder = command(kind, files, out), tmp_path
        limit = 256 * 1024 if kind == "merge" else 1 << 20  # below either output's size
    line = assert_clean_error(start(args, preexec=_fsize_limit(limit)), out, folder)
    assert "could not write" in line and ("too large" in line.lower() or "File too large" in line), line
    check_sources(sources)
    tally("writes").add(f"{kind} on a full disk (rlimit): clean error")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("kind", ["bake", "merge"] if LONG else ["bake"])
def test_full_disk_tmpfs_gives_one_error_line_and_no_partial_file(tiny_tmpfs, sources, kind):
    files, _ = sources
    out = tiny_tmpfs / "out.safetensors"
    line = assert_clean_error(start(command(kind, files, out)), out, tiny_tmpfs)
    assert "could not write" in line and "No space left" in line, line
    check_sources(sources)
    tally("writes").add(f"{kind} on a full disk (tmpfs): clean error")
