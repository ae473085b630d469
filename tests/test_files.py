"""The atomic-write helper and the evaluation report writers that use it."""

import json
import math
import os
import stat

import pytest

from grc_jax import files
from grc_jax.eval import report


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_replaces_the_file_whole_with_the_usual_mode(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    assert files.atomic_write_bytes(path, b"new contents") == path
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == files.default_mode()  # not mkstemp's 0600
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    files.atomic_write_json(path, {"v": 1})

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        files.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_fsyncs_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    files.atomic_write_json(tmp_path / "r.json", {"x": [1, 2]}, indent=2)
    assert calls[:2] == ["fsync", "replace"]  # data on disk before the name points at it
    assert (tmp_path / "r.json").read_text() == json.dumps({"x": [1, 2]}, indent=2) + "\n"


def test_an_object_json_cannot_hold_leaves_the_previous_file(tmp_path):
    path = tmp_path / "a.json"
    files.atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_report_json_and_tensorboard(tmp_path):
    path = report.write_json(tmp_path, {"metrics": {"a": 0.5}, "when": tmp_path})
    assert json.loads(path.read_text()) == {"metrics": {"a": 0.5}, "when": str(tmp_path)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = report.write_tensorboard(tmp_path, {"retrieval/toy/recall@1": 0.25, "latency/x": math.nan}, step=7)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert events.Tags()["scalars"] == ["eval/retrieval/toy/recall_at_1"]  # the NaN is left out
    (event,) = events.Scalars("eval/retrieval/toy/recall_at_1")
    assert (event.step, event.value) == (7, 0.25)


def test_a_write_removes_what_killed_writes_of_the_same_file_left(tmp_path):
    target = tmp_path / "bank.npz"
    dead = tmp_path / ".bank.npz.999999999-abc.tmp"  # a pid no process has
    older = tmp_path / ".bank.npz.k2j_x8.tmp"  # the naming before the pid was in it
    live = tmp_path / f".bank.npz.{os.getpid()}-q1.tmp"  # a write under way in this process
    other = tmp_path / ".other.npz.999999999-abc.tmp"  # another file's
    for f in (dead, older, live, other):
        f.write_bytes(b"partial")
    files.atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not dead.exists() and not older.exists()
    assert live.exists() and other.exists()
