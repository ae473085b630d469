"""Hostile but fair input: settings that cannot work, resumes that do not fit, exports onto odd
paths, the demo world's limit. Each fails with a message naming what is wrong, before anything
is written or lost."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
import pytest

from grc_jax import errors, hf, model, train, train_config
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import config_file, config_for  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    demo_world.write_demo_world(str(out), seed=0, num_entities=40, num_heldout=8)
    return out


@contextmanager
def time_limit(seconds: int):
    """Turns a hang into a failure (SIGALRM in the main thread)."""
    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 1. optimizer and model numbers --------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("train.learning_rate", -1.0), ("train.learning_rate", 0.0), ("train.learning_rate", float("nan")),
    ("train.learning_rate", float("inf")), ("train.weight_decay", -0.01), ("train.clip_norm", -1.0),
    ("train.clip_norm", 0.0), ("train.b1", 1.5), ("train.b1", -0.1), ("train.b2", 1.0),
    ("train.end_learning_rate_fraction", -0.5), ("train.end_learning_rate_fraction", float("nan")),
    ("loss.temperature", float("nan")), ("loss.gen", -1.0), ("loss.rep", float("inf")),
    ("model.rms_norm_eps", 0.0), ("model.rms_norm_eps", -1e-6), ("model.rope_theta", 0.0),
    ("model.rope_theta", float("nan")), ("model.initializer_range", float("inf")),
])
def test_optimizer_and_model_numbers_are_checked_naming_the_key(world, tmp_path, key, value):
    with pytest.raises(errors.UserError, match=rf"^config: {key}={value}"):
        train.train_and_evaluate(config_for(world, **{key: value}), tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written before the settings are checked"


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", 0.0), ("rope_theta", -1.0), ("rope_theta", float("nan")), ("hidden_size", 0),
    ("num_layers", -1), ("hidden_size", "64"), ("num_layers", 2.0), ("vocab_size", True), ("head_dim", 0),
])
def test_model_config_refuses_numbers_that_cannot_work(field, value):
    with pytest.raises(ValueError, match=rf"^{field}"):
        ModelConfig(**{field: value})


# --- 7, 9. exports -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=8, num_latents=2, max_segment_len=8, embed_dim=8)
    return config, model.init_params(config, jax.random.key(0))


def test_export_onto_an_existing_file_is_refused(tmp_path, tiny):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes.txt: a file, not a directory"):
        hf.save_pretrained(*tiny, target)
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("shard_size", [5 * 10**9, 4000])
def test_every_exported_file_gets_the_usual_mode(tmp_path, tiny, shard_size):
    old = os.umask(0o022)
    try:
        hf.save_pretrained(*tiny, tmp_path / "export", max_shard_size=shard_size)
    finally:
        os.umask(old)
    files = sorted((tmp_path / "export").iterdir())
    assert any(f.name.endswith(".safetensors") for f in files)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}


# --- 8. the demo world's limit -------------------------------------------------------------


def test_a_demo_world_larger_than_its_attribute_tuples_is_refused():
    limit = demo_world.MAX_ENTITIES
    assert limit == int(np.prod([len(demo_world.ATTRIBUTE_VALUES[k]) for k in demo_world.ATTRIBUTES]))
    with time_limit(20), pytest.raises(errors.UserError, match=rf"num_entities={limit + 1} .* at most {limit}"):
        demo_world.build_world(num_entities=limit + 1)


def test_train_refuses_a_demo_world_too_large_before_writing_it(tmp_path):
    c = config_for(tmp_path, **{"data.train_files": None, "data.tokenizer": None, "data.demo_world_entities": 10000})
    with time_limit(20), pytest.raises(errors.UserError, match=r"data.demo_world_entities=10000 .* at most 9216"):
        train.train_and_evaluate(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()
