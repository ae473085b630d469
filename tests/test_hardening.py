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

from grc_jax import errors, hf, model, train
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


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.learning_rate", -1.0),
        ("train.learning_rate", 0.0),
        ("train.learning_rate", float("nan")),
        ("train.learning_rate", float("inf")),
        ("train.weight_decay", -0.01),
        ("train.clip_norm", -1.0),
        ("train.clip_norm", 0.0),
        ("train.b1", 1.5),
        ("train.b1", -0.1),
        ("train.b2", 1.0),
        ("train.end_learning_rate_fraction", -0.5),
        ("train.end_learning_rate_fraction", float("nan")),
        ("loss.temperature", float("nan")),
        ("loss.gen", -1.0),
        ("loss.rep", float("inf")),
        ("model.rms_norm_eps", 0.0),
        ("model.rms_norm_eps", -1e-6),
        ("model.rope_theta", 0.0),
        ("model.rope_theta", float("nan")),
        ("model.initializer_range", float("inf")),
    ],
)
def test_optimizer_and_model_numbers_are_checked_naming_the_key(world, tmp_path, key, value):
    with pytest.raises(errors.UserError, match=rf"^config: {key}={value}"):
        train.train_and_evaluate(config_for(world, **{key: value}), tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written before the settings are checked"


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", 0.0),
        ("rope_theta", -1.0),
        ("rope_theta", float("nan")),
        ("hidden_size", 0),
        ("num_layers", -1),
        ("hidden_size", "64"),
        ("num_layers", 2.0),
        ("vocab_size", True),
        ("head_dim", 0),
    ],
)
def test_model_config_refuses_numbers_that_cannot_work(field, value):
    with pytest.raises(ValueError, match=rf"^{field}"):
        ModelConfig(**{field: value})


# --- 7, 9. exports -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        num_latents=2,
        max_segment_len=8,
        embed_dim=8,
    )
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
    message = rf"num_entities={limit + 1}: the demo world has at most {limit} people"
    with time_limit(20), pytest.raises(errors.UserError, match=message):
        demo_world.build_world(num_entities=limit + 1)


def test_train_refuses_a_demo_world_too_large_before_writing_it(tmp_path):
    c = config_for(tmp_path, **{"data.train_files": None, "data.tokenizer": None, "data.demo_world_entities": 10000})
    message = r"config: data.demo_world_entities=10000: the demo world has at most 9216 people"
    with time_limit(20), pytest.raises(errors.UserError, match=message):
        train.train_and_evaluate(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- 2, 3 and resumes: a finished run, rerun with other settings ---------------------------


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (in-process, 8 CPU devices)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train.train_and_evaluate(config_for(world, **{"train.steps": 4}), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_with_another_model_shape_is_refused_before_anything_is_written(world, run_copy):
    before = _files(run_copy)
    with pytest.raises(
        errors.UserError,
        match=r"holds checkpoints up to step 4 of another model: hidden_size 32 "
        r"there, 48 now, intermediate_size 64 there, 96 now",
    ):
        train.train_and_evaluate(
            config_for(world, **{"train.steps": 6, "model.hidden_size": 48, "model.intermediate_size": 96}), run_copy
        )
    assert _files(run_copy) == before  # model_config.json and tokenizer/ untouched: the run still opens


def test_rerunning_a_finished_run_keeps_its_results(world, run_copy, capsys):
    before = _files(run_copy)
    result = train.train_and_evaluate(config_for(world, **{"train.steps": 4}), run_copy)
    assert f"{run_copy} is already trained to step 4" in capsys.readouterr().out
    assert _files(run_copy) == before
    assert result == json.loads(before["result.json"]) and [h["step"] for h in result["history"]] == [1, 2, 3, 4]


def test_train_steps_below_the_saved_step_is_a_clear_error(world, run_copy):
    with pytest.raises(errors.UserError, match=r"config: train.steps=3 is below step 4, the last one saved in"):
        train.train_and_evaluate(config_for(world, **{"train.steps": 3}), run_copy)


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("train.seed", 1, "seed 0 there, 1 now"),
        ("train.global_batch", 16, "global_batch 8 there, 16 now"),
        ("data.train_files", "OTHER", "train_files"),
        ("data.row_len", 448, "row_len 384 there, 448 now"),
    ],
)
def test_resume_with_other_data_settings_is_refused(world, run_copy, tmp_path, key, value, named):
    if value == "OTHER":
        value = str(tmp_path / "other.jsonl")
        shutil.copy(world / "train.jsonl", value)
    before = _files(run_copy)
    with pytest.raises(errors.UserError, match=rf"trained on other data settings.*{named}"):
        train.train_and_evaluate(config_for(world, **{"train.steps": 6, key: value}), run_copy)
    assert _files(run_copy) == before


def test_a_truncated_checkpoint_names_its_step_and_offers_the_previous(world, run_copy):
    files = [p for p in (run_copy / "checkpoints" / "4").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(
        errors.UserError,
        match=r"checkpoints/4: the checkpoint of step 4 cannot be read .* move it "
        r"aside to resume from step 2, the one before",
    ):
        train.train_and_evaluate(config_for(world, **{"train.steps": 6}), run_copy)


def test_a_resume_with_the_same_settings_goes_on(world, run_copy):
    # How the steps compute (rematerialisation, bfloat16 matmul operands) may change on a resume.
    changes = {"train.steps": 6, "model.remat_policy": "full", "model.matmul_dtype": "bfloat16"}
    result = train.train_and_evaluate(config_for(world, **changes), run_copy)
    assert [h["step"] for h in result["history"]] == [5, 6]
    assert json.loads((run_copy / "data_settings.json").read_text())["global_batch"] == 8
    assert json.loads((run_copy / "model_config.json").read_text())["matmul_dtype"] == "bfloat16"


# --- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank"])
def test_an_empty_or_blank_training_file_is_named(world, tmp_path, content):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    with pytest.raises(errors.UserError, match=rf"no usable training records in {data} \(0 record"):
        train.train_and_evaluate(config_for(world, **{"data.train_files": str(data)}), tmp_path / "run")


def test_deeply_nested_json_is_a_malformed_line(tmp_path):
    from grc_jax.data import records

    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(errors.UserError, match=rf"^{data}:2: invalid JSON \(nested too deeply\)"):
        records.read_records(data)
    kept, skipped = records.read_records(data, skip_malformed=True)
    assert [r.text for r in kept] == ["fine"] and skipped == 1


@pytest.mark.parametrize("files", ["", " , ,"])
def test_explicitly_empty_train_files_are_refused(world, tmp_path, files):
    with pytest.raises(errors.UserError, match=r"config: data.train_files=.* names no file; leave it unset"):
        train.train_and_evaluate(config_for(world, **{"data.train_files": files}), tmp_path / "run")
    assert not (tmp_path / "run" / "demo_world").exists()


# --- one clean line from every CLI ---------------------------------------------------------


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_train_cli_prints_a_user_error_as_one_line(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "positive": 3}\n')
    proc = _cli(
        "grc_jax.train",
        f"--config={config_file(tmp_path, world)}",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.train_files={bad}",
        "--config.train.learning_rate=-1",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "error: config: train.learning_rate=-1.0 must be > 0 and finite"
    proc = _cli(
        "grc_jax.train",
        f"--config={config_file(tmp_path, world)}",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.train_files={bad}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:1: field 'positive' must be a string, got number"


def test_demo_world_and_demo_clis_print_a_user_error_as_one_line(tmp_path):
    proc = _cli("grc_jax.data.demo_world", "--out", str(tmp_path / "w"), "--num-entities", "10000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: num_entities=10000: the demo world has at most 9216 people (one per distinct attribute tuple)"
    )
    proc = _cli("grc_jax.demo", "--hf", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: not a directory"


def test_demo_hf_opens_an_export_whose_k_is_not_4(tmp_path, tiny, capsys):
    from grc_jax import demo

    tokenizer = demo._demo_tokenizer(tmp_path)
    config = tiny[0].replace(vocab_size=len(tokenizer), embed_dim=None)
    hf.save_pretrained(config, model.init_params(config, jax.random.key(0)), tmp_path / "export", tokenizer)
    assert config.num_latents == 2
    demo.main(["--hf", str(tmp_path / "export")])
    assert "K=2 meta latent tokens" in capsys.readouterr().out


# --- exports: stale temporaries, symlinks ---------------------------------------------------


def test_a_save_removes_what_killed_saves_left(tmp_path, tiny):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        tmp_path / f".export.tmp-{dead.pid}-abc",
        tmp_path / ".export.tmp-x1y2z3",
        tmp_path / f".export.old-{dead.pid}",
    ]
    live = tmp_path / f".export.tmp-{os.getppid()}-abc"  # a save under way in a running process
    for d in stale + [live]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / ".other.tmp-1-abc"
    other.mkdir()
    hf.save_pretrained(*tiny, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-1-abc", live.name, "export"])


def test_an_export_through_a_symlink_replaces_what_the_link_points_to(tmp_path, tiny):
    config, params = tiny
    hf.save_pretrained(config, params, tmp_path / "v1")
    (tmp_path / "current").symlink_to("v1")
    doubled = jax.tree.map(lambda x: 2 * x, params)
    hf.save_pretrained(config, doubled, tmp_path / "current")
    assert (tmp_path / "current").is_symlink() and os.readlink(tmp_path / "current") == "v1"
    _, loaded = hf.load_pretrained(tmp_path / "v1")
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(doubled["embed"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


# --- HF loading errors name the file and key ------------------------------------------------


@pytest.fixture
def export(tmp_path, tiny):
    return hf.save_pretrained(*tiny, tmp_path / "export")


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: [c], r"config.json: must hold a JSON object, got list"),
        (lambda c: {**c, "num_hidden_layers": 0}, r"config.json: num_hidden_layers must be >= 1, got 0"),
        (lambda c: {**c, "num_hidden_layers": -1}, r"config.json: num_hidden_layers must be >= 1, got -1"),
        (lambda c: {**c, "hidden_size": "16"}, r"config.json: hidden_size must be an integer, got '16'"),
        (
            lambda c: {**c, "num_attention_heads": True},
            r"config.json: num_attention_heads must be an integer, got True",
        ),
        (lambda c: {**c, "rms_norm_eps": "tiny"}, r"config.json: rms_norm_eps must be a number, got 'tiny'"),
        (lambda c: {**c, "torch_dtype": "float64", "dtype": None}, r"config.json: torch_dtype 'float64' is not one of"),
    ],
)
def test_bad_config_json_values_name_the_file_and_key(export, change, message):
    _edit_json(export / "config.json", change)
    with pytest.raises(errors.UserError, match=message):
        hf.load_pretrained(export)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda g: {k: v for k, v in g.items() if k != "max_segment_len"},
            r"grc_config.json: missing key 'max_segment_len'",
        ),
        (lambda g: {**g, "num_latents": "2"}, r"grc_config.json: num_latents has the wrong type: '2'"),
        (lambda g: [g], r"grc_config.json: must hold a JSON object, got list"),
    ],
)
def test_bad_grc_config_names_the_file_and_key(export, change, message):
    _edit_json(export / "grc_config.json", change)
    with pytest.raises(errors.UserError, match=message):
        hf.load_pretrained(export)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_an_integer_or_bool_weight_is_refused(export, dtype):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(export / "model.safetensors"))
    name = "model.layers.0.input_layernorm.weight"
    tensors[name] = np.ones_like(tensors[name], dtype=dtype)
    save_file(tensors, str(export / "model.safetensors"))
    with pytest.raises(errors.UserError, match=rf"model.safetensors: tensor '{name}' has dtype"):
        hf.load_pretrained(export)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", ".", 3])
def test_shard_names_must_stay_inside_the_checkpoint(tmp_path, tiny, shard):
    out = hf.save_pretrained(*tiny, tmp_path / "export", max_shard_size=4000)
    index = out / "model.safetensors.index.json"
    _edit_json(index, lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": shard}})
    with pytest.raises(errors.UserError, match=r"weight_map\['model.norm.weight'\] = .* is not a file name inside"):
        hf.load_pretrained(out)


def test_evaluate_out_naming_an_existing_file_is_one_line_before_the_model_loads(tmp_path, capsys):
    from grc_jax import evaluate

    out = tmp_path / "report.txt"
    out.write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(
            ["--hf", str(tmp_path / "no_model"), "--out", str(out), "--generation", str(tmp_path / "g.jsonl")]
        )
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out={out}: a file, not a directory; name a directory for report.json"
    )
    assert out.read_text() == "mine"


def test_evaluate_names_a_token_flag_the_tokenizer_lacks_before_the_model_loads(tmp_path, capsys):
    from grc_jax import evaluate
    from grc_jax.data import demo_world
    from grc_jax.tokenizer import Tokenizer

    model_dir = tmp_path / "model"  # a tokenizer and no weights: loading the model would fail otherwise
    Tokenizer(demo_world.train_tokenizer(["Zorvak lives in Quarn."] * 4, vocab_size=300)).save(model_dir)
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(
            [
                "--hf",
                str(model_dir),
                "--out",
                str(tmp_path / "out"),
                "--eos-token",
                "<|nope|>",
                "--generation",
                str(tmp_path / "g.jsonl"),
            ]
        )
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --eos-token='<|nope|>' is not a token of the tokenizer at {model_dir}"
    )
