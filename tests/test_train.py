"""The training job: losses fall, kill-and-resume is exact, meshes and processes agree, errors are clear."""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from grc_jax import train, train_config
from grc_jax.data import demo_world

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.head_dim": 8,
    "model.tie_word_embeddings": True,
    "model.num_latents": 4,
    "model.max_segment_len": 96,
    "data.row_len": 384,
    "data.max_segments_per_row": 8,
    "data.max_negatives": 2,
    "data.reader_distractors": 2,
    "train.steps": 8,
    "train.global_batch": 8,
    "train.learning_rate": 3e-3,
    "train.warmup_steps": 2,
    "checkpoint.every": 2,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    demo_world.write_demo_world(str(out), seed=0, num_entities=40, num_heldout=8)
    return out


def config_for(world: Path, **changes):
    c = train_config.defaults()
    values = {**OVERRIDES, "data.train_files": str(world / "train.jsonl"), "data.tokenizer": str(world), **changes}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def config_file(tmp_path: Path, world: Path, **changes) -> Path:
    """The same settings as a configs/*.py file, for runs in a subprocess."""
    values = {**OVERRIDES, "data.train_files": str(world / "train.jsonl"), "data.tokenizer": str(world), **changes}
    lines = ["from grc_jax.train_config import defaults", "def get_config():", "    c = defaults()"]
    lines += [f"    c.{k} = {v!r}" for k, v in values.items()] + ["    return c"]
    path = tmp_path / "test_config.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(config: Path, workdir: Path, *extra: str, env_devices: int = 1, extra_env: dict | None = None, **popen):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={env_devices}",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "grc_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def losses_of(workdir: Path) -> dict[int, float]:
    history = json.loads((workdir / "result.json").read_text())["history"]
    return {h["step"]: h["loss"] for h in history}


def kill_and_resume(config: Path, workdir: Path, kill_after: int) -> dict[int, float]:
    """Runs `config` on `workdir`, SIGKILLs it once step `kill_after` is logged, reruns it to the
    end, and returns the losses the rerun logged (it resumes from the last checkpoint)."""
    proc = run_cli(config, workdir)
    for line in proc.stdout:
        if line.startswith(f"step {kill_after}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"run ended before step {kill_after}"
    resumed = run_cli(config, workdir)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    after = losses_of(workdir)
    assert 1 < min(after) <= kill_after + 1, f"killed after step {kill_after}, resumed at {min(after)}"
    return after


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted one-device run in a subprocess: the baseline for the tests below."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_cli(config_file(tmp, world), tmp / "run")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return losses_of(tmp / "run")


@pytest.mark.slow
def test_losses_fall_and_everything_is_logged(world, tmp_path):
    config = config_for(world, **{"train.steps": 40, "checkpoint.every": 40})
    result = train.train_and_evaluate(config, tmp_path)
    history = result["history"]
    for name in ("loss", "loss_gen", "loss_rep", "loss_comp"):
        early = np.mean([h[name] for h in history[:5]])
        late = np.mean([h[name] for h in history[-10:]])
        assert late < 0.9 * early, (name, early, late)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss_gen", "loss_rep", "loss_comp", "learning_rate", "grad_norm", "tokens_per_second", "step_time"} <= tags
    assert (tmp_path / "model_config.json").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_weight_decay_spares_norms_and_biases_of_stacked_layers():
    t = train_config.defaults().train
    t.unlock()
    t.update(weight_decay=0.1, learning_rate=0.1, warmup_steps=1, steps=10)
    tx, _ = train.make_optimizer(t)
    ones = lambda *shape: np.ones(shape, np.float32)
    params = {
        "embed": ones(6, 4),
        "final_norm": ones(4),
        "layers": {"input_norm": ones(2, 4), "q_norm": ones(2, 2), "q_bias": ones(2, 2, 2), "q_proj": ones(2, 4, 2, 2)},
    }
    state = tx.init(params)
    for _ in range(3):  # the first step's learning rate is 0 (warmup)
        updates, state = tx.update(jax.tree.map(np.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    decayed = {
        "/".join(str(k.key) for k in path): bool(np.all(p < 1))
        for path, p in jax.tree_util.tree_leaves_with_path(params)
    }
    assert decayed == {
        "embed": True,
        "final_norm": False,
        "layers/input_norm": False,
        "layers/q_norm": False,
        "layers/q_bias": False,
        "layers/q_proj": True,
    }


@pytest.mark.slow
def test_gradient_accumulation_gives_the_whole_batch_gradient(world, tmp_path):
    """With the contrastive loss off (it contrasts within each micro-batch), 2 micro-batches give
    the gradient and the losses of the whole batch."""
    from grc_jax import model
    from grc_jax.data import pipeline

    setup, _ = train.prepare(config_for(world), tmp_path)
    batch = pipeline.make_dataset(setup.train_files, setup.tokenizer, setup.build, global_batch=8, num_steps=1, seed=0)[
        0
    ]
    params = model.init_params(setup.model_config, jax.random.key(0))
    sgd = optax.sgd(1.0)  # new params = params - gradient

    def step(accum):
        config = config_for(world, **{"loss.rep": 0.0, "train.grad_accum": accum})
        new, metrics = jax.jit(
            lambda s, b: train.train_step(
                s, b, model_config=setup.model_config, tx=sgd, schedule=lambda _: 1.0, config=config
            )
        )(train.init_state(params, sgd, 0), batch)
        return jax.tree.map(lambda p, n: p - n, params, new["params"]), metrics

    whole, whole_metrics = step(1)
    micro, micro_metrics = step(2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), whole, micro)
    for name in ("loss", "loss_gen", "loss_comp", "gen_tokens", "comp_tokens", "grad_norm"):
        np.testing.assert_allclose(micro_metrics[name], whole_metrics[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.subprocess
def test_eight_device_mesh_matches_one_device(world, tmp_path, reference):

    assert jax.device_count() == 8
    config = config_for(world, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    result = train.train_and_evaluate(config, tmp_path)
    eight = {h["step"]: h["loss"] for h in result["history"]}
    # Different reduction orders across 8 shards: float32 rounding, growing slowly with the steps.
    np.testing.assert_allclose(
        [eight[s] for s in sorted(reference)], [reference[s] for s in sorted(reference)], rtol=2e-4
    )


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_at_a_random_step_then_resume_gives_the_same_losses(world, tmp_path, reference):
    kill_after = random.randint(3, 6)
    after = kill_and_resume(config_file(tmp_path, world), tmp_path / "run", kill_after)
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), (kill_after, step)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("mesh", [{}, {"mesh.data": 1, "mesh.tensor": 2}], ids=["data", "tensor_across_hosts"])
def test_two_processes_match_one_process(world, tmp_path, reference, mesh):
    """launch/local.sh starts two processes on localhost (gloo collectives); two steps give the
    one-process losses, with the batch split over the processes or, with a tensor axis across
    them, the same rows fed by both. (This is also launch/local.sh's end-to-end test.)"""
    import re

    config = config_file(tmp_path, world, **{"train.steps": 2, "checkpoint.every": 2, **mesh})
    env = {
        **os.environ,
        "CONFIG": str(config),
        "WORKDIR": str(tmp_path / "run"),
        "NUM_PROCESSES": "2",
        "PYTHON": sys.executable,
        "TIMEOUT": "200",
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=480
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"^\[0\] step 2/2 ", result.stdout, re.M) and re.search(r"^\[1\] ", result.stdout, re.M)
    two = losses_of(tmp_path / "run")
    np.testing.assert_allclose([two[1], two[2]], [reference[1], reference[2]], rtol=1e-5 if not mesh else 2e-4)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(world, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = config_file(tmp_path, world, **{"train.steps": 40, "checkpoint.every": 100})
    env = {"JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [
        run_cli(
            config,
            tmp_path / "run",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            extra_env=env,
        )
        for i in range(2)
    ]
    try:
        for line in procs[1].stdout:
            if line.startswith("step 3/"):
                procs[1].send_signal(signal.SIGTERM)
                break
        outs = [p.communicate(timeout=360)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    stops = [re.findall(r"stopped for preemption at step (\d+)", out) for out in outs]
    assert stops[0] and stops[0] == stops[1], stops
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [int(stops[0][0])]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    config = config_for(
        world,
        **{
            "train.learning_rate": 1e30,
            "train.warmup_steps": 1,
            "train.clip_norm": 1e30,
            "checkpoint.every": 1,
            "checkpoint.use_async": False,
        },
    )
    with pytest.raises(train.NonFiniteLoss, match=r"non-finite loss or gradient at step (\d+); stopping") as info:
        train.train_and_evaluate(config, tmp_path)
    bad_step = int(info.value.args[0].split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad_step


class _FailingIterator:
    """The training iterator, raising a data error at its `fail_at`-th batch."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __next__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("data.jsonl:7: record needs 629 tokens, more than row_len 512")
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@pytest.mark.slow
def test_an_error_mid_run_finishes_the_checkpoint_being_written(world, tmp_path, monkeypatch):
    # The asynchronous save of step 3 is still being written when the 4th batch fails; the error
    # must not leave it half-written (before, the exit abandoned it and the run lost 3 steps).
    make_iterator = train.pipeline.make_iterator
    monkeypatch.setattr(train.pipeline, "make_iterator", lambda ds: _FailingIterator(make_iterator(ds), 4))
    config = config_for(world, **{"train.steps": 6, "checkpoint.every": 3, "checkpoint.use_async": True})
    with pytest.raises(ValueError, match="data.jsonl:7"):
        train.train_and_evaluate(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("every", [100, 1], ids=["between_checkpoints", "on_a_checkpoint_step"])
def test_sigterm_saves_a_checkpoint_and_exits(world, tmp_path, every):
    config = config_file(tmp_path, world, **{"train.steps": 40, "checkpoint.every": every})
    proc = run_cli(config, tmp_path / "run")
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    proc.wait(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and 3 <= max(saved) < 40


@pytest.mark.subprocess
def test_unknown_config_key_names_the_closest(world, tmp_path):
    proc = run_cli(config_file(tmp_path, world), tmp_path / "run", "--config.train.stpes=3")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "config error: unknown key 'train.stpes' in --config.train.stpes; did you mean train.steps?" in out


@pytest.mark.subprocess
def test_unknown_key_in_a_config_file_is_one_clean_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from grc_jax.train_config import defaults\ndef get_config():\n    c = defaults()\n"
        "    c.train.stepz = 5\n    return c\n"
    )
    proc = run_cli(path, tmp_path / "run")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert (
        'config error: Key "stepz" does not exist and cannot be added since the config is locked. '
        'Did you mean "steps" instead of "stepz"?' in out
    )
    assert "Other fields present" not in out


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.grad_accum", 0, "train.grad_accum=0 must be >= 1"),
        ("log_every", 0, "log_every=0 must be >= 1"),
        ("checkpoint.every", 0, "checkpoint.every=0 must be >= 1"),
        ("mesh.fsdp", 0, r"mesh.fsdp=0 must be >= 1, or -1 for the devices left over"),
        ("mesh.data", -2, r"mesh.data=-2 must be >= 1, or -1"),
        ("loss.temperature", 0.0, r"loss.temperature=0.0 must be > 0"),
        ("data.retention", 1.0, r"data.retention=1.0 must be in \[0, 1\)"),
        ("data.retention", 0.25, r"data.retention needs model.hf_path"),
        ("data.demo_world_records", "qa", r"data.demo_world_records='qa' must be one of all, questions"),
        ("data.demo_world_records", "questions", r"data.demo_world_records chooses demo-world records; this run"),
    ],
)
def test_values_that_cannot_work_fail_at_start(world, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=rf"^config: {message}"):
        train.train_and_evaluate(config_for(world, **{key: value}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_key_in_a_config_file_fails_at_once():
    c = train_config.defaults()
    with pytest.raises(AttributeError, match=r"stpes"):
        c.train.stpes = 3


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_gives_a_valid_model(path):
    """Mistakes a config file can make that only show when the model is built (qk_norm on an
    architecture without it, heads that do not divide) fail here, not at the start of a GPU job."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    train_config.check_keys(c)
    train_config.check_values(c)
    if not c.model.hf_path:  # the others take their model from the checkpoint's config.json
        assert train_config.model_config(c, vocab_size=1000).num_latents == c.model.num_latents


def test_the_model_section_is_model_configs_fields_and_defaults():
    """One list of fields and one set of defaults: the training config's model section is
    ModelConfig's, less what the tokenizer (vocab_size), a checkpoint (rope_scaling) and the
    architecture (qk_norm, qkv_bias) give."""
    import dataclasses

    from grc_jax.config import ModelConfig

    c = train_config.defaults()
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(c.model.keys()) == fields - {"vocab_size", "rope_scaling"} | {"hf_path"}
    assert train_config.model_config(c, vocab_size=100) == ModelConfig(vocab_size=100)


@pytest.mark.parametrize(
    "architecture, qk_norm, qkv_bias",
    [("LlamaForCausalLM", False, False), ("Qwen2ForCausalLM", False, True), ("Qwen3ForCausalLM", True, False)],
)
def test_the_architecture_fixes_qk_norm_and_qkv_bias(architecture, qk_norm, qkv_bias):
    c = train_config.defaults()
    c.model.architecture = architecture
    built = train_config.model_config(c, vocab_size=100)
    assert (built.qk_norm, built.qkv_bias) == (qk_norm, qkv_bias)
    c.model.qk_norm = qk_norm  # agreeing with the architecture is allowed
    assert train_config.model_config(c, vocab_size=100) == built
    c.model.qk_norm = not qk_norm
    with pytest.raises(
        ValueError,
        match=rf"^config: model.qk_norm={not qk_norm} does not fit "
        rf"model.architecture='{architecture}', which fixes qk_norm={qk_norm}",
    ):
        train_config.model_config(c, vocab_size=100)


def test_model_errors_name_the_config_key():
    c = train_config.defaults()
    c.model.num_heads, c.model.num_kv_heads = 6, 4
    with pytest.raises(ValueError, match=r"^config: model.num_heads=6 is not a multiple of num_kv_heads=4"):
        train_config.model_config(c, vocab_size=100)


def test_a_checkpoint_fixes_the_architecture_shapes_and_what_the_architecture_fixes(world, tmp_path):
    """With model.hf_path, the model section's unset keys take the checkpoint's values (qkv_bias
    from its Qwen2 architecture); a key set to something else fails before the weights load."""
    from grc_jax import hf, model
    from grc_jax.config import ModelConfig
    from grc_jax.tokenizer import Tokenizer

    vocab = len(Tokenizer.from_dir(world))
    saved = ModelConfig(
        architecture="Qwen2ForCausalLM",
        qkv_bias=True,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_latents=4,
        max_segment_len=96,
        rms_norm_eps=1e-5,
    )
    ckpt = hf.save_pretrained(saved, model.init_params(saved, jax.random.key(0)), tmp_path / "ckpt")
    unset = {f"model.{key}": None for key in train_config.CHECKPOINT_FIELDS}  # num_latents 4, P 96 as saved
    unset.update(
        {
            "data.bos_token": "<s>",
            "data.eos_token": "</s>",
            "data.pad_token": "<pad>",
            "data.eor_token": "<|end_of_reasoning|>",
        }
    )  # the demo world's; the checkpoint names none
    setup, params = train.prepare(config_for(world, **unset, **{"model.hf_path": str(ckpt)}), tmp_path / "run")
    assert setup.model_config == saved and params is not None
    for key, value in (
        ("model.qkv_bias", False),
        ("model.hidden_size", 48),
        ("model.rms_norm_eps", 1e-6),
        ("model.architecture", "Qwen3ForCausalLM"),
    ):
        name = key.split(".")[1]
        config = config_for(world, **{**unset, "model.hf_path": str(ckpt), key: value})
        with pytest.raises(
            ValueError,
            match=rf"^config: model.{name}={value!r}, but the checkpoint {ckpt} has "
            rf"{name}={getattr(saved, name)!r}; leave model.{name} unset",
        ):
            train.prepare(config, tmp_path / "run")


def test_malformed_data_line_names_file_and_line(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (world / "train.jsonl").read_text().splitlines()[:5]
    bad.write_text("\n".join(good + ['{"query": "x", "positive": 3}']) + "\n")
    config = config_for(world, **{"data.train_files": str(bad), "train.steps": 1})
    with pytest.raises(ValueError, match=rf"{bad}:6: "):
        train.train_and_evaluate(config, tmp_path / "run")


def test_mesh_that_does_not_fit_the_devices(world, tmp_path):
    config = config_for(world, **{"mesh.data": 3})
    with pytest.raises(ValueError, match=r"mesh: \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices, there are 8"):
        train.train_and_evaluate(config, tmp_path)


@pytest.mark.slow
@pytest.mark.subprocess
def test_readme_main_command_runs_configs_tiny_and_prints_its_evaluation(tmp_path):
    """`python -m grc_jax.train --config=configs/tiny.py`, shortened by overrides. 4 held-out people
    (the fewest a world may have): fewer other documents than the evaluation's 4 distractors."""
    proc = run_cli(
        REPO / "configs" / "tiny.py",
        tmp_path / "run",
        "--config.train.steps=2",
        "--config.data.demo_world_entities=40",
        "--config.data.demo_world_heldout=4",
        "--config.eval_max_queries=4",
        "--config.reasoning_max_tokens=4",
        "--config.log_every=1",
        "--config.eval_every=1",
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "step 2/2 | loss" in out
    # eval_every=1: a periodic evaluation after step 1, then the final one
    assert "held-out evaluation at step 1: retrieval/recall@1" in out
    assert "held-out evaluation at step 2: retrieval/recall@1" in out and "memory_qa/exact_match" in out
    assert "multihop/recall@1_self_reasoning" in out
    assert (tmp_path / "run" / "demo_world" / "world.json").is_file()
    # The console: progress, one line per checkpoint, the outcome and the next commands; library
    # INFO logs (Orbax, JAX, grain) only in the workdir's train.log.
    run = tmp_path / "run"
    assert f"checkpoint at step 2: {run / 'checkpoints' / '2'}" in out
    heldout = f"--qa={run}/demo_world/heldout.jsonl"
    assert f"python -m grc_jax.evaluate --checkpoint={run} --out={run / 'eval'} {heldout}" in out
    assert f"python -m grc_jax.serve --model={run}" in out and f"python -m grc_jax.export --workdir={run}" in out
    own_files = {p.name for p in (REPO / "grc_jax").rglob("*.py")}
    info_from = re.findall(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", out, flags=re.M)
    assert set(info_from) <= own_files, set(info_from) - own_files
    assert "orbax" not in out.lower() and "checkpoint_manager" in (run / "train.log").read_text()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [e["step"] for e in result["evals"]] == [1] and "retrieval/recall@1" in result["eval"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("retrieval/recall_at_1")] == [1, 2]
    assert [e.step for e in events.Scalars("multihop/recall_at_1_self_reasoning")] == [1, 2]
