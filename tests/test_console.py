"""What the training command prints: its own lines on the console, library INFO logs in a file."""

import logging
from pathlib import Path

import pytest
from absl import logging as absl_logging

from grc_jax import console, train

LIBRARY_FILE = str(Path(logging.__file__))  # any file outside grc_jax stands for Orbax, grain or JAX


def _record(level: int, pathname: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


@pytest.mark.parametrize(
    "level, pathname, shown",
    [
        (logging.INFO, LIBRARY_FILE, False),
        (logging.DEBUG, LIBRARY_FILE, False),
        (logging.WARNING, LIBRARY_FILE, True),
        (logging.ERROR, LIBRARY_FILE, True),
        (logging.INFO, train.__file__, True),  # the run's own INFO lines (data summary, resume)
    ],
)
def test_console_keeps_the_runs_own_lines_and_warnings(level, pathname, shown):
    assert console.OwnLinesOnly().filter(_record(level, pathname)) is shown


def test_setup_logging_sends_library_info_to_the_file_only(tmp_path, capsys):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    handler_filters = {h: list(h.filters) for h in handlers}  # pytest's own capture handlers among them
    absl_handler = absl_logging.get_absl_handler()
    filters, absl_level = list(absl_handler.filters), logging.getLogger("absl").level
    stream = logging.StreamHandler()  # stands for the console handler absl installs under app.run
    root.addHandler(stream)
    try:
        path = console.setup_logging(tmp_path / "run", verbose=False)
        logging.getLogger("orbax.checkpoint").info("Saving checkpoint at step 2")
        logging.getLogger("orbax.checkpoint").warning("disk almost full")
        assert path == tmp_path / "run" / "train.log"
        for handler in root.handlers:
            handler.flush()
        logged = path.read_text()
        assert "Saving checkpoint at step 2" in logged and "disk almost full" in logged
        err = capsys.readouterr().err
        assert "Saving checkpoint" not in err and "disk almost full" in err
        assert console.setup_logging(tmp_path / "run", process_id=3, verbose=False).name == "train.3.log"
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        for handler, kept in handler_filters.items():  # setup_logging filters every console handler
            handler.filters[:] = kept
        absl_handler.filters[:] = filters
        logging.getLogger("absl").setLevel(absl_level)  # set_verbosity(-1) would pin WARNING, not restore NOTSET


def test_next_steps_are_commands_for_this_run(tmp_path):
    run = tmp_path / "my run"
    (run / "demo_world").mkdir(parents=True)
    (run / "demo_world" / "heldout.jsonl").write_text("{}\n")
    text = console.next_steps(run)
    assert (
        f"python -m grc_jax.evaluate --checkpoint='{run}' --out='{run / 'eval'}' --qa='{run}/demo_world/heldout.jsonl'"
    ) in text
    assert f"python -m grc_jax.serve --model='{run}'" in text
    assert f"python -m grc_jax.export --workdir='{run}' --out='{run / 'export'}'" in text


def test_summary_says_how_far_the_run_got(tmp_path):
    done = console.summary(tmp_path, {"history": [{"step": 8, "loss": 1.5}], "train_seconds": 125.0})
    assert "trained to step 8 in 2 min 05 s; last loss 1.500" in done and str(tmp_path / "result.json") in done
    assert "run the same command again to resume" in console.summary(tmp_path, {"preempted_at": 3, "history": []})
