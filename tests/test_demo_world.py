"""Tests for the built-in demo world (grc_jax.data.demo_world)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from grc_jax.data import demo_world as dw

REPO_ROOT = Path(__file__).resolve().parents[1]
REASONING_RE = re.compile(r"^The mentor of (\w+) is (\w+)\.$")


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _mentions(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def _strings(record: dict[str, Any]) -> list[str]:
    out = []
    for value in record.values():
        out += value if isinstance(value, list) else [value]
    return out


@pytest.fixture(scope="module")
def world() -> dw.World:
    return dw.build_world(seed=0)


@pytest.fixture(scope="module")
def out_dir(world: dw.World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo_world_seed0")
    dw.write_world(world, str(path))
    return path


@pytest.fixture(scope="module")
def files(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {key: _read_jsonl(out_dir / name) for key, name in dw.FILES.items() if name.endswith(".jsonl")}


def test_same_seed_identical_different_seed_differs(out_dir: Path, tmp_path: Path) -> None:
    dw.write_demo_world(str(tmp_path / "again"), seed=0)
    dw.write_demo_world(str(tmp_path / "other"), seed=1)
    for name in dw.FILES.values():
        first = (out_dir / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first, name
        if name.endswith(".jsonl"):
            assert (tmp_path / "other" / name).read_bytes() != first, name


def test_files_match_the_world(world: dw.World, files: dict[str, list[dict[str, Any]]]) -> None:
    assert files["train"] == world.train
    assert files["heldout"] == world.heldout
    assert files["multihop_eval"] == world.multihop_eval
    for split in ("train", "heldout"):
        corpus = files[f"corpus_{split}"]
        assert [c["id"] for c in corpus] == [e.name for e in world.split(split)]
        assert all(c["text"] == world.documents[c["id"]] for c in corpus)


def test_world_json(out_dir: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    meta = json.loads((out_dir / "world.json").read_text(encoding="utf-8"))
    assert meta["seed"] == 0
    assert meta["files"] == dw.FILES
    assert meta["special_tokens"] == {"<pad>": 0, "<s>": 1, "</s>": 2, "<|end_of_reasoning|>": 3}
    counts = meta["counts"]
    assert counts["entities_train"] + counts["entities_heldout"] == dw.DEFAULT_NUM_ENTITIES
    assert counts["entities_heldout"] == dw.DEFAULT_NUM_HELDOUT
    for key in ("train", "heldout", "multihop_eval"):
        assert counts[key]["records"] == len(files[key])
    assert len(files["corpus_train"]) == counts["entities_train"]
    assert len(files["corpus_heldout"]) == counts["entities_heldout"]
    # Every objective and self-reasoning are fed from train.jsonl.
    assert all(counts["train"][k] > 0 for k in ("retrieval_qa", "multihop", "text"))
    assert meta["description"]


def test_heldout_and_train_never_mix(world: dw.World, out_dir: Path) -> None:
    train_names = [e.name for e in world.split("train")]
    heldout_names = [e.name for e in world.split("heldout")]
    assert len(set(train_names + heldout_names)) == len(world.entities)
    for e in world.entities:
        assert e.mentor != e.name
        assert (e.mentor in heldout_names) == (e.split == "heldout")

    def words(names: tuple[str, ...]) -> set[str]:
        # A whole-word search, done once per file instead of once per name.
        return {w for n in names for w in re.findall(r"\w+", (out_dir / n).read_text("utf-8"))}

    train_words = words(("train.jsonl", "corpus_train.jsonl", "multihop_eval.jsonl"))
    heldout_words = words(("heldout.jsonl", "corpus_heldout.jsonl"))
    assert set(train_names) <= train_words and set(heldout_names) <= heldout_words
    assert not train_words & set(heldout_names)
    assert not heldout_words & set(train_names)


def test_every_record_feeds_a_loss(files: dict[str, list[dict[str, Any]]]) -> None:
    for key in ("train", "heldout", "multihop_eval"):
        for rec in files[key]:
            assert (
                {"query", "positive"} <= rec.keys()
                or {"positive", "question", "answer"} <= rec.keys()
                or "text" in rec
                or {"query", "reasoning"} <= rec.keys()
            ), rec
            assert all(isinstance(s, str) and s for s in _strings(rec)), rec


def test_negatives_are_distinct_documents_of_the_same_split(world: dw.World) -> None:
    splits = (("train", world.train + world.multihop_eval), ("heldout", world.heldout))
    for split, records in splits:
        docs = {world.documents[e.name] for e in world.split(split)}
        for rec in records:
            if "negatives" not in rec:
                continue
            negs = rec["negatives"]
            assert dw.NEGATIVES_RANGE[0] <= len(negs) <= dw.NEGATIVES_RANGE[1]
            assert len(set(negs)) == len(negs)
            assert rec["positive"] not in negs
            assert rec["positive"] in docs and set(negs) <= docs


def test_multihop_records(world: dw.World) -> None:
    by_name = {e.name: e for e in world.entities}
    records = [r for r in world.train + world.multihop_eval if "reasoning" in r]
    assert len(records) > 0 and all("reasoning" in r for r in world.multihop_eval)
    for rec in records:
        subject, bridge = REASONING_RE.match(rec["reasoning"]).groups()
        assert by_name[subject].mentor == bridge
        assert by_name[subject].split == "train"
        assert _mentions(subject, rec["query"])
        # Self-reasoning is needed: only the reasoning names the bridge.
        assert not _mentions(bridge, rec["query"])
        assert _mentions(bridge, rec["reasoning"])
        assert rec["positive"] == world.documents[bridge]
        assert _mentions(bridge, rec["question"])
        assert _mentions(rec["answer"], rec["positive"])
        assert rec["answer"] in by_name[bridge].values


def test_multihop_eval_is_absent_from_train(world: dw.World) -> None:
    assert len(world.multihop_eval) >= 1
    train_queries = {r["query"] for r in world.train if "query" in r}
    train_reasoning = {r["reasoning"] for r in world.train if "reasoning" in r}
    for rec in world.multihop_eval:
        assert rec["query"] not in train_queries
        # Held out by subject: the bridge step of an eval query is never trained directly.
        assert rec["reasoning"] not in train_reasoning


def test_direct_queries_identify_exactly_one_person(world: dw.World) -> None:
    for split, records in (("train", world.train), ("heldout", world.heldout)):
        people = world.split(split)
        # Training adds a record per person that looks the person up by name.
        by_name = [r for r in records if "query" in r and r.get("answer") == r["positive"]]
        assert all(_mentions({d: n for n, d in world.documents.items()}[r["positive"]], r["query"]) for r in by_name)
        assert len(by_name) == (len(people) if split == "train" else 0)
        direct = [r for r in records if "query" in r and "reasoning" not in r and r not in by_name]
        assert len(direct) == dw.QA_PER_ENTITY * len(people)
        for rec in direct:
            mentioned = {
                kind: [v for v in values if _mentions(v, rec["query"])] for kind, values in dw.ATTRIBUTE_VALUES.items()
            }
            mentioned = {k: v for k, v in mentioned.items() if v}
            assert mentioned and all(len(v) == 1 for v in mentioned.values()), rec["query"]
            matches = [e for e in people if all(e.attribute(k) == v[0] for k, v in mentioned.items())]
            assert len(matches) == 1, rec["query"]
            assert rec["positive"] == world.documents[matches[0].name]


def test_memory_qa_answers_come_from_the_positive(world: dw.World) -> None:
    by_doc = {doc: name for name, doc in world.documents.items()}
    qa = [r for r in world.train + world.heldout if "question" in r and "reasoning" not in r]
    assert qa
    describe = [r for r in qa if r["answer"] == r["positive"]]
    assert len(describe) == len(world.split("train"))  # one per training person, none held out
    assert not [r for r in world.heldout if r["answer"] == r["positive"]]
    for rec in qa:
        name = by_doc[rec["positive"]]
        assert _mentions(name, rec["question"])
        if rec not in describe:
            assert _mentions(rec["answer"], rec["positive"])
            assert len(rec["answer"].split()) == 1


def test_mentors_are_a_few_senior_people_of_each_split(world: dw.World) -> None:
    for split in ("train", "heldout"):
        people = world.split(split)
        mentors = {e.mentor for e in people}
        assert len(mentors) == max(2, round(len(people) / dw.MENTEES_PER_MENTOR))
        assert mentors <= {e.name for e in people}


def test_documents_state_the_mentor_as_the_reasoning_does(world: dw.World) -> None:
    # Self-reasoning recalls this exact sentence; a reversed phrasing could not be recalled.
    for e in world.entities:
        assert dw._REASONING.format(n=e.name, mentor=e.mentor) in world.documents[e.name]


def test_multihop_subjects_are_repeated_as_text(world: dw.World) -> None:
    texts = [r["text"] for r in world.train if "text" in r]
    subjects = {
        REASONING_RE.match(r["reasoning"]).group(1) for r in world.train + world.multihop_eval if "reasoning" in r
    }
    assert len(subjects) == round(len(world.split("train")) * dw.MULTIHOP_SUBJECT_FRACTION)
    assert sorted(texts) == sorted(world.documents[s] for s in subjects for _ in range(dw.TEXT_REPEATS))


def test_document_token_budget(out_dir: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    meta = json.loads((out_dir / "world.json").read_text(encoding="utf-8"))
    lo, hi = meta["doc_token_budget"]["min"], meta["doc_token_budget"]["max"]
    assert (lo, hi) == dw.DOC_TOKEN_BUDGET
    docs = [c["text"] for c in files["corpus_train"] + files["corpus_heldout"]]
    lengths = [len(tok.encode(d).ids) for d in docs]
    assert all(lo <= n <= hi for n in lengths), (min(lengths), max(lengths))
    assert meta["doc_tokens"]["max"] == max(lengths)


def test_tokenizer(out_dir: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for i, special in enumerate(("<pad>", "<s>", "</s>", "<|end_of_reasoning|>")):
        assert tok.token_to_id(special) == i
    assert 400 <= tok.get_vocab_size() <= 1000
    strings = sorted({s for key in files for rec in files[key] for s in _strings(rec)})
    for s, enc in zip(strings, tok.encode_batch(strings)):
        assert tok.decode(enc.ids) == s
    # Special tokens are atomic and survive a round trip when asked to.
    text = "<s>Who taught Zorvak?<|end_of_reasoning|></s>"
    ids = tok.encode(text).ids
    assert ids[0] == 1 and ids[-2:] == [3, 2]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_heldout_tokens_are_trained(out_dir: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))

    def ids(records: list[dict[str, Any]]) -> set[int]:
        strings = sorted({s for rec in records for s in _strings(rec)})
        return {i for enc in tok.encode_batch(strings) for i in enc.ids}

    assert ids(files["heldout"]) <= ids(files["train"])
    # Names are cut into syllables, never a single whole-name token.
    for c in files["corpus_heldout"] + files["corpus_train"]:
        assert len(tok.encode(" " + c["id"]).ids) >= 3  # the space, then 2-3 syllables


def test_template_words_are_not_cut_as_names() -> None:
    dw.check_pre_tokenizer()
    assert dw.name_pieces("Zorvak") == ["Zor", "vak"]
    assert dw.name_pieces("mentor") == ["mentor"]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        dw.build_world(seed=0, num_entities=10, num_heldout=7)
    with pytest.raises(ValueError):
        dw.build_world(seed=0, num_entities=40, num_heldout=2)


@pytest.mark.subprocess
def test_cli_writes_the_files(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = ["--seed", "3", "--num-entities", "40", "--num-heldout", "10"]
    proc = subprocess.run(
        [sys.executable, "-m", "grc_jax.data.demo_world", "--out", str(tmp_path / "cli"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["counts"]["entities_train"] == 30
    assert printed["counts"]["entities_heldout"] == 10
    # Same bytes from another process as from this one (no hash-seed dependence).
    dw.write_demo_world(str(tmp_path / "lib"), seed=3, num_entities=40, num_heldout=10)
    for name in dw.FILES.values():
        cli_file = tmp_path / "cli" / name
        assert cli_file.stat().st_size > 0
        assert cli_file.read_bytes() == (tmp_path / "lib" / name).read_bytes(), name
