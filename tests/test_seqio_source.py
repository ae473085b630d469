"""Training records from seqio Tasks (`data.train_files=seqio:NAME[:SPLIT]`).

Most tests stand a small fake `seqio` module in for the real one (which pulls TensorFlow), with
the same calls (`get_mixture_or_task(name).get_dataset(...).as_numpy_iterator()`) and the same
example values (bytes scalars, 1-D object arrays of bytes, int token arrays). The last test runs
the real seqio where it imports (the `seqio` extra).
"""

import sys
import types

import numpy as np
import pytest

from grc_jax.data import seqio_source
from grc_jax.data.records import Record, read_records
from grc_jax.train_config import defaults

EXAMPLES = [
    {
        "query_pretokenized": b"who keeps an owl?",
        "query": np.array([5, 6, 7], np.int32),
        "positive": b"Ada keeps an owl.",
        "negatives": np.array([b"Bo keeps a cat.", "Cy keeps a dog.".encode()], object),
        "question": np.array(b"What pet does Ada keep?", object),
        "answer": b"an owl",
        "id": 3,
    },
    {"text": "caf\u00e9 text, already a str", "query": b"", "negatives": np.array([], object)},
]


class _FakeTask:
    def __init__(self, examples, calls):
        self.examples, self.calls = examples, calls

    def get_dataset(self, **kwargs):
        self.calls.append(kwargs)
        examples = self.examples
        return types.SimpleNamespace(as_numpy_iterator=lambda: iter(examples))


@pytest.fixture
def fake_seqio(monkeypatch):
    """Installs a fake seqio with tasks {name: examples}; returns (tasks, calls)."""
    tasks, calls = {}, []

    def get_mixture_or_task(name):
        if name not in tasks:
            raise ValueError(f"Mixture or Task '{name}' not found in registry.")
        return _FakeTask(tasks[name], calls)

    monkeypatch.setitem(sys.modules, "seqio", types.SimpleNamespace(get_mixture_or_task=get_mixture_or_task))
    return tasks, calls


def test_seqio_examples_become_records(fake_seqio):
    tasks, calls = fake_seqio
    tasks["grc_demo"] = EXAMPLES
    records, skipped = read_records(["seqio:grc_demo:validation"])
    assert skipped == 0
    assert records == [
        Record(
            source="seqio:grc_demo:validation#0",
            query="who keeps an owl?",
            positive="Ada keeps an owl.",
            negatives=("Bo keeps a cat.", "Cy keeps a dog."),
            question="What pet does Ada keep?",
            answer="an owl",
        ),
        Record(source="seqio:grc_demo:validation#1", text="caf\u00e9 text, already a str"),
    ]
    # Read once, in order: the packing plan shuffles, and seqio's own shuffling would break resumption.
    assert calls == [dict(sequence_length=None, split="validation", shuffle=False, num_epochs=1, use_cached=False)]


def test_seqio_split_defaults_to_train_and_mixes_with_jsonl(fake_seqio, tmp_path):
    tasks, calls = fake_seqio
    tasks["grc_demo"] = EXAMPLES[1:]
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "from a file"}\n')
    records, _ = read_records([str(path), "seqio:grc_demo"])
    assert [(r.source, r.text) for r in records] == [
        (f"{path}:1", "from a file"),
        ("seqio:grc_demo:train#0", "caf\u00e9 text, already a str"),
    ]
    assert calls[0]["split"] == "train"


def test_malformed_seqio_example_is_named_and_can_be_skipped(fake_seqio):
    tasks, _ = fake_seqio
    tasks["bad"] = [{"text": b"fine"}, {"question": b"a question with no answer", "positive": b"doc"}]
    with pytest.raises(ValueError, match=r"^seqio:bad:train#1: 'question' without 'answer' feeds no loss"):
        read_records(["seqio:bad"])
    records, skipped = read_records(["seqio:bad"], skip_malformed=True)
    assert [r.text for r in records] == ["fine"] and skipped == 1


@pytest.mark.parametrize(
    "example, why",
    [
        ({"answer": np.array([1, 2]), "question": b"q", "positive": b"p"}, r"#0: feature 'answer' holds token ids"),
        (
            {"inputs": b"x", "targets": b"y"},
            r"#0: the example has none of the features .*its features: inputs, targets",
        ),
        ({"text": b"\xff"}, r"#0: feature 'text' is not UTF-8"),
        ({"positive": b"p", "question": b"q", "answer": b"a", "negatives": b"one"}, r"'negatives' must be a 1-D list"),
    ],
)
def test_unusable_seqio_examples_fail_even_when_skipping(fake_seqio, example, why):
    # A feature of the wrong type is the task's fault, not one example's: every example has it.
    tasks, _ = fake_seqio
    tasks["t"] = [example]
    with pytest.raises(ValueError, match=why):
        read_records(["seqio:t"], skip_malformed=True)


def test_seqio_source_errors(fake_seqio, monkeypatch):
    with pytest.raises(ValueError, match=r"'seqio:missing'.*no seqio Task or Mixture 'missing'.*data.seqio_modules"):
        read_records(["seqio:missing"])
    for entry in ("seqio:", "seqio:task:"):
        with pytest.raises(ValueError, match="expected seqio:TASK_NAME or seqio:TASK_NAME:SPLIT"):
            read_records([entry])
    monkeypatch.setitem(sys.modules, "seqio", None)  # what an environment without the extra gives
    with pytest.raises(ImportError, match=r"'seqio:t' needs seqio: pip install 'grc_jax\[seqio\]'"):
        read_records(["seqio:t"])


def test_seqio_modules_are_imported_and_named_when_missing(monkeypatch, tmp_path):
    (tmp_path / "grc_test_tasks.py").write_text("REGISTERED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "grc_test_tasks", raising=False)
    seqio_source.import_task_modules(" grc_test_tasks, ")
    assert sys.modules["grc_test_tasks"].REGISTERED
    with pytest.raises(ImportError, match=r"data.seqio_modules: cannot import 'no_such_module_here'"):
        seqio_source.import_task_modules("no_such_module_here")
    assert defaults().data.seqio_modules == ""


def test_real_seqio_task():
    seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed")
    tf = pytest.importorskip("tensorflow")

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices(
            {
                "query": ["who keeps an owl?", "who keeps a cat?"],
                "positive": ["Ada keeps an owl.", "Bo keeps a cat."],
                "negatives": [["Bo keeps a cat."], ["Ada keeps an owl."]],
            }
        )

    name = "grc_jax_test_task"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]), output_features={})
    records, _ = read_records([f"seqio:{name}"])
    assert [(r.source, r.query, r.negatives) for r in records] == [
        ("seqio:grc_jax_test_task:train#0", "who keeps an owl?", ("Bo keeps a cat.",)),
        ("seqio:grc_jax_test_task:train#1", "who keeps a cat?", ("Ada keeps an owl.",)),
    ]
