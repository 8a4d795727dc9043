import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.typed_config import ConfigError, load
from data_pipeline.config import PipelineConfig


@dataclass
class Inner:
    n: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    rate: float = 0.5
    inner: Inner = field(default_factory=Inner)
    items: list[str] = field(default_factory=list)


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: from-yaml\ninner:\n  n: 3\n")
    c = load(Outer, y, ["inner.mode=b", "rate=2", "items=[p, q]"])
    assert (c.name, c.rate, c.inner.n, c.inner.mode, c.items) == ("from-yaml", 2.0, 3, "b", ["p", "q"])


def test_on_off_settings_take_bare_on_and_off(tmp_path):
    """YAML 1.1 reads a bare on/off as a boolean: `model.packing=on` must still mean "on"."""
    from trainer.config import TrainConfig

    y = tmp_path / "c.yaml"
    y.write_text("shards: s\nrun:\n  output_dir: o\nmodel:\n  path: m\n  packing: off\n")
    assert load(TrainConfig, y, []).model.packing == "off"
    assert load(TrainConfig, y, ["model.packing=on"]).model.packing == "on"
    with pytest.raises(ConfigError, match="is not one of"):
        load(Outer, None, ["inner.mode=true"])  # no on/off among the choices: a boolean stays an error


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.nn=3", "inner: unknown key(s) ['nn']"),
        ("inner.n=three", "inner.n: expected an integer"),
        ("inner.mode=c", "inner.mode: 'c' is not one of ['a', 'b']"),
        ("rate=true", "rate: expected a number"),
        ("nokey", "not of the form key.path=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(Outer, None, [override])


def test_pipeline_config_validation():
    with pytest.raises(ValueError, match="samples_per_shard must be >= 1"):
        load(PipelineConfig, None, ["samples_per_shard=0"])
    with pytest.raises(ValueError, match="prompt_max_len must exceed"):
        load(PipelineConfig, None, ["tokenization.prompt_max_len=64", "tokenization.query_max_len=64"])


def test_config_hash_ignores_runtime_fields():
    a = load(PipelineConfig, None, ["output=/x", "num_workers=1"])
    b = load(PipelineConfig, None, ["output=/y", "num_workers=4"])
    c = load(PipelineConfig, None, ["samples_per_shard=7"])
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_every_pipeline_recipe_loads():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("pipeline-*.yaml"))
    assert recipes
    for r in recipes:
        load(PipelineConfig, r)


def test_every_training_recipe_loads():
    from pathlib import Path

    from trainer.config import TrainConfig

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("stage*.yaml"))
    assert len(recipes) == 4
    for r in recipes:
        c = load(TrainConfig, r, ["shards=/s", "model.path=/m", "run.output_dir=/o"])
        assert c.stage in (1, 2)


def test_train_config_rejects_impossible_values():
    from trainer.config import TrainConfig

    base = ["shards=/s", "model.path=/m", "run.output_dir=/o"]
    # a failed validate() is a ConfigError: the CLIs print it as one line, not a traceback
    with pytest.raises(ConfigError, match="warmup_steps \\(50\\) exceeds run.max_steps \\(10\\)"):
        load(TrainConfig, None, base + ["optim.warmup_steps=50", "run.max_steps=10"])
    with pytest.raises(ConfigError, match="shards: set it"):
        load(TrainConfig, None, ["model.path=/m", "run.output_dir=/o"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: 4 is not one of"):
        load(TrainConfig, None, base + ["deepspeed.zero_stage=4"])


@pytest.mark.parametrize("module, cls_path", [("trainer", "trainer.config.TrainConfig"),
                                              ("data_pipeline", "data_pipeline.config.PipelineConfig"),
                                              ("data_pipeline teacher", "data_pipeline.teacher.TeacherConfig")])
def test_help_lists_every_config_field_with_type_default_and_description(module, cls_path):
    """--help is built from the dataclasses (common/typed_config.py describe), so it cannot drift from them; a new
    field without a comment fails here."""
    import importlib
    import subprocess
    import sys

    from common.typed_config import describe

    mod, name = cls_path.rsplit(".", 1)
    rows = describe(getattr(importlib.import_module(mod), name))
    assert [r[0] for r in rows if not r[3]] == []  # every field says what it is for
    out = subprocess.run([sys.executable, "-m", *module.split(), "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    for key, tp, default, _ in rows:
        assert f"  {key} " in out and f"{tp} = {default}" in out, key
