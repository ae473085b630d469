"""The compiled decode loop kept in the compilation cache's programs directory
(grc_jax/compile_cache.py): a fresh process with a warm cache generates the same tokens without
tracing the loop (the program read back in the background while the Engine is set up), a damaged
or stale program file is ignored (traced again, still right), and old programs are pruned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from grc_jax import compile_cache, hf, model
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world
from grc_jax.inference import Engine
from grc_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Zorvak lives in Quarn and keeps an owl."
NEW_TOKENS = 12
OPTIONS = dict(num_pages=64, page_size=4, prefill_chunk=16)

# A fresh process: open the model, generate greedily, report the token ids, how often the decode
# loop was traced and what the programs directory did.
CHILD = f"""
import json, sys
from grc_jax import compile_cache
from grc_jax.inference import Engine, loop
engine = Engine.from_pretrained(sys.argv[1], weights=sys.argv[2], **{OPTIONS!r})
ids = engine.decoder.generate([engine.tokenize({PROMPT!r})], engine.decoder.settings({NEW_TOKENS}))[0]
print("RESULT " + json.dumps({{"ids": ids, "traces": loop.TRACES["run"], "stats": dict(compile_cache.STATS)}}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = Tokenizer(
        demo_world.train_tokenizer([PROMPT, "Belna is a glassblower from Ostreth."] * 4, vocab_size=300)
    )
    config = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_latents=4,
        max_segment_len=16,
    )
    params = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, params)  # sharper logits: varied tokens
    return hf.save_pretrained(config, params, tmp_path_factory.mktemp("cc") / "model", tokenizer)


def _child(model_dir: Path, cache: Path, weights: str = "float") -> dict:
    env = {**os.environ, compile_cache.ENV: str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), weights],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


def _reference(model_dir: Path, monkeypatch, weights: str = "float") -> list[int]:
    """The tokens of the plain jitted loop (no programs directory), in this process."""
    monkeypatch.setattr(compile_cache, "programs_dir", lambda: None)
    engine = Engine.from_pretrained(model_dir, weights=weights, **OPTIONS)
    return engine.decoder.generate([engine.tokenize(PROMPT)], engine.decoder.settings(NEW_TOKENS))[0]


def _programs(cache: Path) -> list[Path]:
    return sorted((cache / compile_cache.PROGRAMS_DIR).glob("decode_run-*.bin"))


@pytest.mark.parametrize("weights", ["float", "int8"])  # int8: a program that calls the native kernel
def test_a_warm_process_loads_the_decode_loop_instead_of_tracing_it(model_dir, tmp_path, monkeypatch, weights):
    cache = tmp_path / "cache"
    cold = _child(model_dir, cache, weights)
    assert cold["traces"] == 1 and cold["stats"] == {"compiled": 1, "saved": 1}
    assert len(_programs(cache)) == 1
    program_time = _programs(cache)[0].stat().st_mtime
    os.utime(_programs(cache)[0], (program_time - 100, program_time - 100))
    warm = _child(model_dir, cache, weights)
    # Read back by the Engine's prefetch, before the first call asked for it; the load marks it used.
    assert warm["traces"] == 0 and warm["stats"] == {"loaded": 1, "prefetched": 1}
    assert _programs(cache)[0].stat().st_mtime > program_time - 50
    assert warm["ids"] == cold["ids"] == _reference(model_dir, monkeypatch, weights)
    assert len(set(cold["ids"])) > 1  # a real continuation, not one repeated token


def test_a_damaged_or_stale_program_is_ignored(model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _child(model_dir, cache)
    [program] = _programs(cache)
    good = program.read_bytes()
    # Damaged: cut short. The loop is traced again, gives the same tokens, and the file is rewritten.
    program.write_bytes(good[: len(good) // 2])
    damaged = _child(model_dir, cache)
    assert damaged["traces"] == 1 and damaged["stats"] == {"rejected": 1, "compiled": 1, "saved": 1}
    assert damaged["ids"] == first["ids"]
    rewritten = program.read_bytes()
    assert rewritten.startswith(good[: good.index(b"\nsource ")]) and len(rewritten) > len(good) // 2
    # Stale: a file under this name whose recorded key differs (as if written by other code or versions).
    key_start = good.index(b"\njax ") + 5
    program.write_bytes(good[:key_start] + b"0.0.0" + good[key_start + 5 :])
    stale = _child(model_dir, cache)
    assert stale["traces"] == 1 and stale["stats"] == {"rejected": 1, "compiled": 1, "saved": 1}
    assert stale["ids"] == first["ids"] == _reference(model_dir, monkeypatch)
    assert _child(model_dir, cache)["stats"] == {"loaded": 1, "prefetched": 1}  # the rewritten file is good again


def test_prefetch_reads_back_only_programs_of_its_model_and_source(model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _child(model_dir, cache)
    [program] = _programs(cache)
    key = compile_cache._read_key(program)
    assert key.startswith("program decode_run\n")
    marker = key[key.index("ModelConfig(") :].split('"', 1)[0]  # the model's config repr
    monkeypatch.setattr(compile_cache, "programs_dir", lambda: cache / compile_cache.PROGRAMS_DIR)
    monkeypatch.setattr(compile_cache, "_prefetched", {})
    compile_cache.prefetch("decode_run", "ModelConfig(another model")
    assert compile_cache._prefetched == {}
    compile_cache.prefetch("decode_run", marker)
    found_key, executable = compile_cache._prefetched[program].result()
    assert found_key == key and executable is not None
    monkeypatch.setattr(compile_cache, "_prefetched", {})
    monkeypatch.setattr(compile_cache, "_source_hash", lambda: "other source")
    compile_cache.prefetch("decode_run", marker)
    assert compile_cache._prefetched == {}


def test_from_pretrained_asks_for_its_models_program_before_loading_weights(model_dir, tmp_path, monkeypatch):
    from grc_jax.inference import engine as engine_module

    asked = []
    monkeypatch.setattr(compile_cache, "prefetch", lambda name, marker: asked.append((name, marker)))
    engine_module._prefetch_decode_loop(model_dir)  # an HF directory (a GRC export): its shapes
    config, _ = hf.load_pretrained(model_dir)
    [(name, marker)] = asked
    assert name == "decode_run" and marker in repr(config) and "num_heads=4" in marker
    engine_module._prefetch_decode_loop(tmp_path)  # nothing to open: nothing asked, no error
    assert len(asked) == 1


def test_old_programs_are_pruned_least_recently_used_first(tmp_path):
    for i in range(5):
        path = tmp_path / f"decode_run-{i}.bin"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    compile_cache._touch(tmp_path / "decode_run-0.bin")  # used just now: the newest
    compile_cache._prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == [
        "decode_run-0.bin",
        "decode_run-3.bin",
        "decode_run-4.bin",
    ]
