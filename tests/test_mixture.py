"""The streaming input path: ArrayRecord read lazily and per host, weighted mixtures, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import config_file, kill_and_resume, losses_of, run_cli

from grc_jax.data import arrayrecord, demo_world, pipeline, streaming
from grc_jax.data.builder import BuildConfig
from grc_jax.layout import READER
from grc_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "banana", "cherry"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{w} number {i} is here" for w in WORDS for i in range(50)]
    return Tokenizer(demo_world.train_tokenizer(texts * 3, vocab_size=300)).with_latents(2, 300)


@pytest.fixture(scope="module")
def build(tokenizer):
    special = {
        name: tokenizer.token_to_id(t)
        for name, t in (("bos_id", "<s>"), ("eos_id", "</s>"), ("eor_id", "<|end_of_reasoning|>"), ("pad_id", "<pad>"))
    }
    return BuildConfig(
        max_segment_len=16,
        num_latents=2,
        latent_ids=tuple(tokenizer.latent_ids(2)),
        row_len=64,
        max_segments_per_row=4,
        **special,
    )


def text_lines(word: str, n: int) -> list[bytes]:
    return [json.dumps({"text": f"{word} number {i} is here"}).encode() for i in range(n)]


def first_words(batch: dict[str, np.ndarray], tokenizer: Tokenizer) -> list[str]:
    """The first word of every reader example in the batch."""
    words = []
    for tokens, example, kind in zip(batch["tokens"], batch["example"], batch["kind"]):
        for e in np.unique(example[example > 0]):
            ids = tokens[(example == e) & (kind == READER)]
            words.append(tokenizer.decode(ids[:3].tolist()).split()[0])
    return words


def test_share_splits_the_records_between_host_blocks():
    shares = [list(streaming.share(10, b, 3)) for b in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shares, [])) == list(range(10))


def test_each_host_block_reads_only_its_share(tmp_path, tokenizer, build, monkeypatch):
    files = arrayrecord.write_shards(text_lines("apple", 23), tmp_path, records_per_shard=10)
    assert [p.name for p in files] == [f"records-0000{i}-of-00003.arrayrecord" for i in range(3)]
    read: dict[int, set[int]] = {}

    class Counting(arrayrecord.ArrayRecordSource):
        def __getitem__(self, index):
            read.setdefault(self.block, set()).add(index)
            return super().__getitem__(index)

    seen = {}
    for block in range(2):
        monkeypatch.setattr(streaming, "ArrayRecordSource", type("C", (Counting,), {"block": block}))
        dataset = pipeline.make_dataset(
            [str(tmp_path / "records-*.arrayrecord")],
            tokenizer,
            build,
            global_batch=4,
            num_steps=10,
            seed=0,
            block=block,
            blocks=2,
        )
        iterator = pipeline.make_iterator(dataset)
        seen[block] = {w for _ in range(10) for w in first_words(next(iterator), tokenizer)}
    assert read[0] == set(streaming.share(23, 0, 2)) and read[1] == set(streaming.share(23, 1, 2))
    assert seen[0] == {"apple"}  # and the batches are made of them


@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.6, 0.2, 0.2)])
def test_mixture_weights_hold_in_the_batches(tmp_path, tokenizer, build, weights):
    """Over 40 batches (about 500 records) each source's share of the records is its weight to within 0.02."""
    spec = []
    for word, weight in zip(WORDS, weights):
        arrayrecord.write_shards(text_lines(word, 7 + len(word)), tmp_path / word, records_per_shard=5)
        spec.append(f"{tmp_path / word}/*.arrayrecord:{weight}")
    dataset = pipeline.make_dataset([], tokenizer, build, global_batch=4, num_steps=40, seed=1, mixture=",".join(spec))
    iterator = pipeline.make_iterator(dataset)
    words = [w for _ in range(40) for w in first_words(next(iterator), tokenizer)]
    assert len(words) > 400
    total = sum(weights)
    for word, weight in zip(WORDS, weights):
        assert abs(words.count(word) / len(words) - weight / total) < 0.02, (word, words.count(word), len(words))


def test_restored_state_gives_the_same_batches(tmp_path, tokenizer, build, monkeypatch):
    arrayrecord.write_shards(text_lines("apple", 9), tmp_path / "a", records_per_shard=4)
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(text_lines("banana", 5)) + b"\n")
    spec = f"{tmp_path}/a/*.arrayrecord:1,{tmp_path}/b.jsonl:2"
    make = lambda: pipeline.make_iterator(
        pipeline.make_dataset([], tokenizer, build, global_batch=2, num_steps=9, seed=3, mixture=spec)
    )
    first = make()
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    expected = [next(first) for _ in range(6)]
    resumed = make()
    resumed.set_state(state)
    monkeypatch.setattr(streaming, "READ_THREADS", 0)  # reading ahead in threads changes nothing
    unthreaded = make()
    unthreaded.set_state(state)
    for want in expected:
        for got in (next(resumed), next(unthreaded)):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a.arrayrecord", r"data.mixture entry 'a.arrayrecord' must be FILES:WEIGHT"),
        ("x.jsonl:0", r"must be FILES:WEIGHT .* a number > 0"),
        ("nothing/*.arrayrecord:1", r"no files match 'nothing/\*.arrayrecord'"),
    ],
)
def test_bad_mixture_is_named(tokenizer, build, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pipeline.make_dataset([], tokenizer, build, global_batch=2, num_steps=1, seed=0, mixture=spec)


def test_train_files_and_mixture_together_fail_at_start():
    from grc_jax import train_config

    c = train_config.defaults()
    c.data.train_files, c.data.mixture = "a.jsonl", "b.jsonl:1"
    with pytest.raises(ValueError, match=r"^config: give data.train_files or data.mixture, not both"):
        train_config.check_values(c)


def test_jsonl_globs_keep_the_global_plan(tmp_path, tokenizer, build):
    """JSONL files, named by a glob, still take the in-memory path: one plan, the same on every host."""
    for word in WORDS[:2]:
        (tmp_path / f"{word}.jsonl").write_bytes(b"\n".join(text_lines(word, 4)) + b"\n")
    dataset = pipeline.make_dataset([str(tmp_path / "*.jsonl")], tokenizer, build, global_batch=2, num_steps=3, seed=0)
    assert len(dataset) == 3 and set(first_words(dataset[0], tokenizer)) <= {"apple", "banana"}
    with pytest.raises(FileNotFoundError, match=r"no files match '.*/\*.json'"):
        pipeline.make_dataset([str(tmp_path / "*.json")], tokenizer, build, global_batch=2, num_steps=3, seed=0)


def test_malformed_arrayrecord_record_names_file_and_record(tmp_path, tokenizer, build):
    arrayrecord.write_shards(text_lines("apple", 3) + [b'{"text": 5}'], tmp_path, records_per_shard=10)
    dataset = pipeline.make_dataset(
        [str(tmp_path / "records-00000-of-00001.arrayrecord")], tokenizer, build, global_batch=1, num_steps=10, seed=0
    )
    iterator = pipeline.make_iterator(dataset)
    with pytest.raises(ValueError, match=r"records-00000-of-00001.arrayrecord:record 3: field 'text' must be a string"):
        for _ in range(10):
            next(iterator)


# --- training on ArrayRecord: kill and resume, two processes ----------------------------------


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory):
    """The demo world's training records as ArrayRecord shards, through prepare's records format."""
    from grc_jax.data.prepare import prepare

    world = tmp_path_factory.mktemp("world")
    demo_world.write_demo_world(str(world), seed=0, num_entities=40, num_heldout=8)
    prepare("records", world / "train.jsonl", world / "shards", format_out="arrayrecord", records_per_shard=40)
    return world


def shard_config(tmp_path: Path, world: Path, **changes) -> Path:
    return config_file(
        tmp_path,
        world,
        **{"data.train_files": str(world / "shards" / "records-*.arrayrecord"), "train.steps": 4, **changes},
    )


@pytest.mark.slow  # real-model load or whole training runs: 15-30 s each
def test_arrayrecord_training_killed_and_resumed_gives_the_same_losses(world_shards, tmp_path):
    config = shard_config(tmp_path, world_shards)
    reference = run_cli(config, tmp_path / "reference")
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    expected = losses_of(tmp_path / "reference")
    kill_after = 3  # after the step-2 checkpoint: the resumed run redoes steps 3 and 4
    after = kill_and_resume(config, tmp_path / "run", kill_after)
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), (kill_after, step)


@pytest.mark.slow  # real-model load or whole training runs: 15-30 s each
def test_two_processes_train_on_their_shares(world_shards, tmp_path):
    """launch/local.sh, two processes with jax.distributed: each logs that it reads half of the records."""
    config = shard_config(tmp_path, world_shards, **{"train.steps": 2, "checkpoint.every": 2})
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
        ["bash", str(REPO / "launch" / "local.sh"), "--alsologtostderr"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    total = sum(1 for line in (world_shards / "train.jsonl").read_text().splitlines() if line.strip())
    for block in range(2):
        assert f"{total} records, {len(streaming.share(total, block, 2))} read by host block {block} of 2" in out
    assert set(losses_of(tmp_path / "run")) == {1, 2}
