"""Every write is temp file + fsync + rename: a writer killed mid-write leaves the old file or the new one."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guard.core.cache import atomic_write_text, load_tensors, remove_stale_temps, save_tensors

# rewrites a 16 MB JSON file and a 16 MB safetensors file as fast as it can, forever: nearly all
# of its time is spent between creating a temporary file and renaming it
WRITER = """
import json, sys, torch
from guard.core.cache import atomic_write_text, save_tensors
out = sys.argv[1]
pad = "x" * 16_000_000
x = torch.zeros(4_000_000)
print("ready", flush=True)
i = 0
while True:
    i += 1
    atomic_write_text(out + "/report.json", '{"i": %d, "pad": "%s"}' % (i, pad))
    x.fill_(float(i))
    save_tensors(out + "/t.safetensors", {"x": x}, {"i": i})
"""


def test_killed_writer_never_leaves_a_half_written_file(tmp_path) -> None:
    atomic_write_text(tmp_path / "report.json", json.dumps({"i": 0}))
    save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(3)}, {"i": 0})
    rng = random.Random(7)
    leftovers, seen = 0, set()
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()  # type: ignore[union-attr]
        time.sleep(rng.uniform(0.05, 0.8))  # inside the write loop
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = json.loads((tmp_path / "report.json").read_text())  # whole, never half
        tensors, meta = load_tensors(tmp_path / "t.safetensors")
        assert bool((tensors["x"] == float(meta["i"])).all())
        seen.add(report["i"] > 0)
        leftovers += len(remove_stale_temps(tmp_path))
    assert True in seen  # the writers did get through writes before they were killed
    assert not list(tmp_path.glob(".*.tmp"))
    assert leftovers >= 1  # some kills did land mid-write (the case the rename protects against)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    atomic_write_text(tmp_path / "a.json", "{}")

    class Boom(Exception):
        pass

    def boom(*args, **kwargs):
        raise Boom

    monkeypatch.setattr("guard.core.cache.save_file", boom)
    with pytest.raises(Boom):
        save_tensors(tmp_path / "a.json", {"x": torch.zeros(2)})
    assert (tmp_path / "a.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_remove_stale_temps_only_touches_temporary_names(tmp_path) -> None:
    (tmp_path / ".report.json.abc.tmp").write_text("half")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.safetensors.q.tmp").write_text("half")
    (tmp_path / ".m.onnx.z.tmp").mkdir()
    (tmp_path / ".m.onnx.z.tmp" / "m.onnx").write_text("staged")
    (tmp_path / "keep.tmp").write_text("a user's file")
    (tmp_path / "report.json").write_text("{}")
    gone = remove_stale_temps(tmp_path)
    assert len(gone) == 3  # two files and the staging folder (with what it held)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["keep.tmp", "report.json", "sub"]
    assert remove_stale_temps(Path(tmp_path / "missing")) == []
