"""run.keep_checkpoints: which checkpoint folders a save leaves behind (trainer/checkpoint.py prune). The whole path
under real DeepSpeed ranks, with a resume, is in test_checkpoint.py::test_exact_resume_after_a_kill."""

from __future__ import annotations

import pytest

from common.typed_config import ConfigError, load
from trainer import checkpoint as C
from trainer.config import TrainConfig


def fake_checkpoints(d, steps, latest):
    for s in steps:
        (d / f"step{s:08d}").mkdir(parents=True)
        (d / f"step{s:08d}" / "trainer_state.json").write_text("{}")
    (d / f"step{steps[0]:08d}.universal").mkdir()  # a conversion made for a resume on another world size
    (d / f"step{steps[-1] + 1:08d}.partial").mkdir()  # an interrupted save: not prune's business
    (d / "latest").write_text(f"step{latest:08d}")


def test_prune_keeps_the_newest_and_the_latest(tmp_path):
    fake_checkpoints(tmp_path, [4, 8, 12, 16], latest=16)
    assert C.prune(tmp_path, 2) == ["step00000004", "step00000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step00000012",
        "step00000016",
        "step00000017.partial",
    ]
    assert C.latest(tmp_path) == "step00000016"


def test_prune_never_removes_what_latest_names(tmp_path):
    # `latest` is only moved after a complete save; if it still names an older one, that one is the resume point
    fake_checkpoints(tmp_path, [4, 8, 12], latest=4)
    assert C.prune(tmp_path, 1) == ["step00000008"]
    assert C.latest(tmp_path) == "step00000004" and (tmp_path / "step00000004.universal").is_dir()


def test_keep_zero_keeps_everything(tmp_path):
    fake_checkpoints(tmp_path, [4, 8], latest=8)
    assert C.prune(tmp_path, 0) == [] and (tmp_path / "step00000004").is_dir()


def test_negative_keep_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load(TrainConfig, None, ["shards=x", "model.path=y", f"run.output_dir={tmp_path}", "run.keep_checkpoints=-1"])
