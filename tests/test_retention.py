"""Retention data (grc_jax/data/retention.py) and how training mixes it in (data.retention,
data.demo_world_records)."""

import json
from pathlib import Path

import jax
import pytest

from grc_jax.data import retention

torch = pytest.importorskip("torch")


def test_an_answer_ends_at_its_last_whole_sentence():
    done = "The sea is vast. It covers most of the planet."
    assert retention.whole_sentences(f"  {done}\n") == done
    cut = "The sea is vast and covers most of the planet. Its deepest point lies in the"
    assert retention.whole_sentences(cut) == "The sea is vast and covers most of the planet."
    assert retention.whole_sentences("The sea is vast. Its deepest point lies in the") == ""  # too short once cut
    assert retention.whole_sentences("no sentence ends anywhere in this rather long answer at all") == ""


def test_prose_is_standard_library_docstrings_cut_at_paragraph_breaks():
    texts = ["A" * 300 + "\n\n" + "B" * 300 + "\n\n" + "C" * 300, "D" * 150]
    assert retention.passages(texts, chars=700) == ["A" * 300 + "\n\n" + "B" * 300, "C" * 300]  # D: too short
    docs = retention.docstrings()
    assert len(docs) > 100 and all(len(d) >= 400 for d in docs) and len(set(docs)) == len(docs)
    import json as json_module

    assert json_module.__doc__.strip() in docs
    prose = retention.passages(docs)
    assert len(prose) > 200 and all(200 <= len(p) for p in prose)


def test_texts_that_do_not_fit_are_left_out_and_built_files_are_kept(tmp_path):
    out = tmp_path / "retention"
    out.mkdir()
    (out / retention.CHAT_FILE).write_text('{"text": "kept as it is"}\n')
    paths = retention.build(out, tmp_path / "no-model-needed", fits=lambda text: len(text) <= 1000)
    prose = [json.loads(line)["text"] for line in paths["prose"].read_text().splitlines()]
    every = retention.passages(retention.docstrings())
    assert prose == [t for t in every if len(t) <= 1000] and len(prose) < len(every)
    assert paths["chat"].read_text() == '{"text": "kept as it is"}\n'


def _chat_model(tmp_path: Path) -> Path:
    from test_chat import SMOLLM2_TEMPLATE, _hf_dir

    return _hf_dir(
        tmp_path, {"generation_config.json": {"eos_token_id": 2}}, {"eos_token": "<|im_end|>"}, SMOLLM2_TEMPLATE
    )


def test_chat_records_are_the_base_model_s_greedy_answers_in_its_chat_template(tmp_path, monkeypatch):
    from grc_jax.inference import Engine

    model_dir = _chat_model(tmp_path)
    monkeypatch.setattr(retention, "TOPICS", ("zorvak", "ostreth"))
    monkeypatch.setattr(retention, "TEMPLATES", ("where does {} live",))
    # A random model ends no sentence: keep its answers whole to see them.
    monkeypatch.setattr(retention, "whole_sentences", lambda answer: answer.strip())
    records = retention.chat_records(model_dir, max_new_tokens=6, batch_size=2)
    engine = Engine.from_pretrained(model_dir, batch_size=2)
    prompts = [engine.render_chat([{"role": "user", "content": f"where does {t} live"}]) for t in ("zorvak", "ostreth")]
    assert prompts[0].startswith("<|im_start|>system\n") and prompts[0].endswith("<|im_start|>assistant\n")
    answers = engine.generate(prompts, max_new_tokens=6)
    assert records == [{"text": p + a.strip()} for p, a in zip(prompts, answers)]


def test_a_base_model_without_a_chat_template_is_named(tmp_path):
    from test_chat import _hf_dir

    model_dir = _hf_dir(tmp_path, {}, {"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match=r"data.retention needs a chat model, and this one has no chat template"):
        retention.build(tmp_path / "out", model_dir)
    assert (tmp_path / "out" / retention.PROSE_FILE).is_file()  # what was built is kept for the next try
    assert not (tmp_path / "out" / retention.CHAT_FILE).exists()


def test_training_mixes_retention_into_the_demo_world_s_question_records(tmp_path):
    """data.retention=0.2 with demo_world_records="questions": the rows come 80% from the world's
    question records, 10% each from the retention files in WORKDIR/retention (kept when already
    built), and the run trains and records these settings."""
    from test_train import config_for

    from grc_jax import hf, model, train, train_config
    from grc_jax.data import demo_world
    from grc_jax.tokenizer import Tokenizer

    world = tmp_path / "world"
    demo_world.write_demo_world(str(world), seed=0, num_entities=40, num_heldout=8)
    saved = train_config.model_config(config_for(world), vocab_size=len(Tokenizer.from_dir(world)))  # test_train's
    ckpt = hf.save_pretrained(saved, model.init_params(saved, jax.random.key(0)), tmp_path / "ckpt")
    workdir = tmp_path / "run"
    chat = '{"text": "<s>where does zorvak live</s>zorvak lives in harbour road."}\n'
    (workdir / "retention").mkdir(parents=True)
    (workdir / "retention" / "chat.jsonl").write_text(chat * 3)
    (workdir / "retention" / "prose.jsonl").write_text('{"text": "zorvak lives in harbour road."}\n' * 3)
    config = config_for(
        world,
        **{f"model.{key}": None for key in train_config.CHECKPOINT_FIELDS},  # the checkpoint's
        **{"model.hf_path": str(ckpt), "data.train_files": None, "data.demo_world_entities": 40},
        **{"data.demo_world_heldout": 8, "data.retention": 0.2, "data.demo_world_records": "questions"},
        **{"data.bos_token": "<s>", "data.eos_token": "</s>", "data.pad_token": "<pad>"},
        **{"data.eor_token": "<|end_of_reasoning|>", "train.steps": 2, "eval_max_queries": 4},
    )
    setup, _ = train.prepare(config, workdir)
    questions = workdir / "demo_world" / "train_questions.jsonl"
    assert setup.mixture == (
        f"{questions}:0.8,{workdir / 'retention' / 'chat.jsonl'}:0.1,{workdir / 'retention' / 'prose.jsonl'}:0.1"
    )
    assert setup.train_files == []
    every = [json.loads(x) for x in (workdir / "demo_world" / "train.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in questions.read_text().splitlines()]
    assert kept == [r for r in every if "question" in r] and 0 < len(kept) < len(every)
    assert (workdir / "retention" / "chat.jsonl").read_text() == chat * 3  # built before: kept, not rebuilt
    result = train.train_and_evaluate(config, workdir)
    assert len(result["history"]) == 2
    settings = json.loads((workdir / train.DATA_SETTINGS_FILE).read_text())
    assert (settings["retention"], settings["demo_world_records"]) == (0.2, "questions")
