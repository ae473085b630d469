"""A training run with its own special tokens (Qwen-style <|im_end|>, </think>) and chat template:
the run directory records them, Engine and `grc_jax.evaluate` open it with no token flags, the
end-of-training export and `python -m grc_jax.export` write HF directories that transformers
loads with the same eos and template and that give the run's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_chat import SMOLLM2_TEMPLATE
from test_train import config_for
from tiny_hf import hf_logits
from tokenizers import Tokenizer as HFTokenizer

from grc_jax import evaluate, export, model, rundir, train
from grc_jax.data import demo_world
from grc_jax.inference import Engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</think>"]
# eos and pad come from the tokenizer's files, bos and eor from config flags
RUN_TOKENS = {"bos": "<|endoftext|>", "eos": ["<|im_end|>"], "pad": "<|endoftext|>", "eor": "</think>"}
ENGINE_OPTIONS = dict(num_pages=64, page_size=4, prefill_chunk=16, batch_size=4, max_reason_tokens=4)
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does Fenelfen live?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two training steps on a small demo world with a Qwen-style tokenizer, exported at the end."""
    tmp = tmp_path_factory.mktemp("export_run")
    world = tmp / "world"
    demo_world.write_demo_world(str(world), seed=0, num_entities=40, num_heldout=8)
    inner = HFTokenizer.from_file(str(world / "tokenizer.json"))
    inner.add_special_tokens(QWEN_SPECIALS)
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    inner.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": SMOLLM2_TEMPLATE,
            }
        )
    )
    config = config_for(
        world,
        **{
            "data.tokenizer": str(tok_dir),
            "data.bos_token": "<|endoftext|>",
            "data.eor_token": "</think>",
            "train.steps": 2,
            "checkpoint.every": 2,
            "export_dir": str(tmp / "export"),
        },
    )
    train.train_and_evaluate(config, tmp / "run")
    return tmp


def test_the_run_directory_records_its_tokens_and_opens_with_no_flags(run):
    workdir = run / "run"
    assert json.loads((workdir / rundir.SPECIAL_TOKENS_FILE).read_text()) == RUN_TOKENS
    assert (workdir / rundir.CHAT_TEMPLATE_FILE).read_text() == SMOLLM2_TEMPLATE
    assert rundir.saved_steps(workdir) == [2]
    engine = Engine.from_pretrained(workdir, **ENGINE_OPTIONS)
    tok = engine.tokenizer
    assert engine.eos_ids == (tok.token_to_id("<|im_end|>"),) and engine.eor_id == tok.token_to_id("</think>")
    assert engine.chat_template == SMOLLM2_TEMPLATE
    assert engine.render_chat(MESSAGES).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    # an explicit value still wins over the recorded one
    assert Engine.from_pretrained(workdir, eos_token="<|endoftext|>", **ENGINE_OPTIONS).special_tokens.eos == (
        "<|endoftext|>",
    )


def test_evaluate_opens_the_run_with_no_token_flags(run, tmp_path):
    report = evaluate.main(
        [
            f"--checkpoint={run / 'run'}",
            f"--qa={run / 'world' / 'heldout.jsonl'}",
            "--task=memory_qa",
            "--limit=2",
            "--qa-max-new-tokens=3",
            "--num-distractors=1",
            f"--out={tmp_path / 'out'}",
            "--batch-size=4",
            "--max-reason-tokens=4",
            "--num-pages=64",
            "--page-size=4",
            "--prefill-chunk=16",
            "--no-progress",
        ]
    )
    assert report["special_tokens"] == RUN_TOKENS and report["step"] == 2
    assert 0.0 <= report["metrics"]["memory_qa/memory/exact_match"] <= 1.0


def _transformers_check(export_dir: Path, engine: Engine) -> None:
    """transformers reads the export's eos, pad, template as Engine does, and greedy decoding agrees."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    assert hf_model.generation_config.eos_token_id == im_end == engine.eos_id
    assert hf_model.config.pad_token_id == engine.tokenizer.token_to_id("<|endoftext|>")
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"
    prompt = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert engine.render_chat(MESSAGES) == prompt
    ids = engine.tokenizer.encode(prompt)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
        )
    new = out[0, len(ids) :].tolist()
    assert engine.chat(MESSAGES, max_new_tokens=6) == engine.tokenizer.decode([t for t in new if t != im_end])


def test_the_end_of_training_export_loads_in_transformers_with_the_same_eos(run):
    export_dir = run / "export"
    generation = json.loads((export_dir / "generation_config.json").read_text())
    engine = Engine.from_pretrained(export_dir, **ENGINE_OPTIONS)
    assert generation["eos_token_id"] == engine.tokenizer.token_to_id("<|im_end|>")
    assert engine.special_tokens.to_json() == RUN_TOKENS and engine.chat_template == SMOLLM2_TEMPLATE
    _transformers_check(export_dir, engine)


def test_export_from_the_command_line_gives_the_run_s_logits(run, tmp_path):
    out = tmp_path / "cli_export"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "grc_jax.export", f"--workdir={run / 'run'}", "--step=2", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to {out}" in proc.stdout
    opened = rundir.open_run(run / "run")
    engine = Engine.from_pretrained(out, **ENGINE_OPTIONS)
    assert engine.special_tokens.to_json() == RUN_TOKENS and engine.chat_template == SMOLLM2_TEMPLATE
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), engine.params, opened.params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    rng = np.random.default_rng(0)
    lengths = (9, 5)
    tokens = rng.integers(0, opened.config.vocab_size, (2, 9)).astype(np.int32)
    valid = np.arange(9)[None] < np.asarray(lengths)[:, None]
    ours = np.asarray(model.forward(opened.config, opened.params, tokens, valid=valid).logits)
    ref = hf_logits(hf_model, tokens, valid)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref).max() > 0.1  # not a comparison of zeros
    _transformers_check(out, engine)


def test_export_cli_errors_are_one_clean_line(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        export.main([f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'nothing'}: not a training run directory (no model_config.json)"
    )
    with pytest.raises(SystemExit):
        export.main([f"--workdir={run / 'run'}", "--step=7", f"--out={tmp_path / 'o'}"])
    assert capsys.readouterr().err.strip() == f"error: --step=7: {run / 'run'} has checkpoints at steps [2]"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export.main([f"--workdir={run / 'run'}", f"--out={tmp_path / 'foreign'}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not empty and not a grc_jax export" in err and "\n" not in err


def test_training_tokens_come_from_the_files_and_flags_and_a_missing_one_is_named(tmp_path):
    from test_chat import write_tokenizer

    from grc_jax import train_config
    from grc_jax.tokenizer import Tokenizer

    write_tokenizer(tmp_path, {"eos_token": "<|im_end|>"})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    tok = Tokenizer.from_dir(tmp_path)
    c = train_config.defaults()
    with pytest.raises(ValueError, match=r"^config: no end-of-reasoning token: .* set --config.data.eor_token="):
        train.resolve_special_tokens(c, tok, str(tmp_path))
    c.data.eor_token = "<|endoftext|>"
    tokens = train.resolve_special_tokens(c, tok, str(tmp_path))
    # no pad or bos named: both are the eos training appends (the tokenizer's, first)
    assert (tokens.bos, tokens.eos, tokens.pad) == ("<|im_end|>", ("<|im_end|>", "<|eot_id|>"), "<|im_end|>")
    c.data.eos_token = "<|eot_id|>"
    assert train.resolve_special_tokens(c, tok, str(tmp_path)).eos == ("<|eot_id|>", "<|im_end|>")
