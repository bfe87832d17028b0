"""Checkpoints: atomic and durable (fsync of the file and of its folder), damaged files reported by name."""

import logging
import os

import pytest
import torch

from dimat import checkpoint
from dimat.checkpoint import CheckpointError


def _state(r):
    return {"round": r, "model": {"w": torch.full((3,), float(r))}}


def test_save_fsyncs_the_file_and_the_folder_and_keeps_the_previous_round(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    checkpoint.save(tmp_path, 3, _state(0))
    checkpoint.save(tmp_path, 3, _state(1))
    assert len(synced) == 4
    assert ".agent-3.pt.tmp" in synced[2] and synced[3] == str(tmp_path)  # the file's bytes, then the renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent-3.prev.pt", "agent-3.pt"]  # no temporary left
    assert checkpoint.resume_round(tmp_path, [3]) == 1
    assert torch.equal(checkpoint.load(tmp_path, 3, 0)["model"]["w"], torch.zeros(3))


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 0, _state(4))

    def broken(state, f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(tmp_path, 0, _state(5))
    assert [p.name for p in tmp_path.iterdir()] == ["agent-0.pt"]
    assert checkpoint.resume_round(tmp_path, [0]) == 4


def test_a_truncated_checkpoint_is_reported_by_name_and_the_previous_one_used(tmp_path, caplog):
    checkpoint.save(tmp_path, 2, _state(6))
    checkpoint.save(tmp_path, 2, _state(7))
    cur = checkpoint.path_for(tmp_path, 2)
    cur.write_bytes(cur.read_bytes()[:40])  # a torn write on a file system without the guarantees above
    caplog.set_level(logging.WARNING, logger="dimat.checkpoint")
    assert checkpoint.resume_round(tmp_path, [2]) == 6
    assert str(cur) in caplog.text and "unreadable checkpoint" in caplog.text
    with pytest.raises(FileNotFoundError, match="unreadable checkpoint"):
        checkpoint.load(tmp_path, 2, 7)


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_an_agent_without_a_readable_checkpoint_is_an_error_naming_the_file(tmp_path, content):
    path = checkpoint.path_for(tmp_path, 1)
    if content is None:
        torch.save({"model": {}}, path)  # readable, but not a checkpoint: no round
        match = "not a dimat checkpoint"
    else:
        path.write_bytes(content)
        match = "unreadable checkpoint"
    with pytest.raises(CheckpointError, match=match) as e:
        checkpoint.resume_round(tmp_path, [1])
    assert str(path) in str(e.value) and "agent 1" in str(e.value)


def test_no_checkpoint_at_all_is_no_round(tmp_path):
    assert checkpoint.resume_round(tmp_path, [0, 1]) is None
