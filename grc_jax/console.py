"""What `python -m grc_jax.train` prints, and where everything else it logs goes.

The console gets the run's own lines: progress, one line per checkpoint, held-out figures,
warnings and errors, and at the end the commands that use the finished run. INFO records of the
libraries underneath (Orbax, absl, grain, JAX) go to `WORKDIR/train.log` only, unless
`--verbose` asks for them on the console too; that file also keeps the run's own INFO lines.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any, Mapping

from absl import flags
from absl import logging as absl_logging

_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "Also print the INFO logs of Orbax, absl, grain and JAX on the console (they always go to WORKDIR/train.log).",
)

LOG_FILE = "train.log"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class OwnLinesOnly(logging.Filter):
    """Passes warnings and errors from anywhere, and INFO or lower only from grc_jax's own code."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(Path(record.pathname).resolve()).startswith(_PACKAGE_DIR)


def setup_logging(workdir: str | Path, process_id: int | None = None, verbose: bool | None = None) -> Path:
    """Sends every log record to WORKDIR/train.log (train.N.log on process N > 0, so hosts sharing
    the workdir do not write one file), and keeps only the run's own lines on the console unless
    `verbose` (default: the --verbose flag). Returns the log file's path."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / (LOG_FILE if not process_id else f"train.{process_id}.log")
    file_handler = logging.FileHandler(path, encoding="utf-8")  # appends: a resumed run keeps one log
    file_handler.setFormatter(absl_logging.PythonFormatter())
    root = logging.getLogger()
    root.addHandler(file_handler)
    absl_logging.set_verbosity(absl_logging.INFO)  # records must exist for the file to get them
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    if verbose is None:
        verbose = flags.FLAGS.is_parsed() and _VERBOSE.value
    if not verbose:
        absl_logging.get_absl_handler().addFilter(OwnLinesOnly())
        for handler in root.handlers:  # a plain StreamHandler where absl's is not installed
            if handler is not file_handler and handler is not absl_logging.get_absl_handler():
                handler.addFilter(OwnLinesOnly())
    return path


def checkpoint_line(step: int, path: str | Path) -> str:
    return f"checkpoint at step {step}: {path}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def summary(workdir: str | Path, result: Mapping[str, Any]) -> str:
    """The run's outcome in a few lines: how far it got, its last loss, where the figures are."""
    workdir = Path(workdir)
    if "preempted_at" in result:
        return (
            f"stopped at step {result['preempted_at']} with a checkpoint; run the same command again to resume from it"
        )
    lines = []
    history = result.get("history") or []
    if history:
        last = history[-1]
        took = f" in {_duration(result['train_seconds'])}" if "train_seconds" in result else ""
        lines.append(f"trained to step {int(last['step'])}{took}; last loss {last['loss']:.3f}")
    else:
        lines.append("nothing left to train: the workdir's latest checkpoint is at the last step")
    lines.append(f"results: {workdir / 'result.json'}; TensorBoard: tensorboard --logdir {workdir / 'tb'}")
    return "\n".join(lines)


def next_steps(workdir: str | Path) -> str:
    """The commands that evaluate, serve and export the run in WORKDIR, ready to paste."""
    run = Path(workdir)
    q = lambda p: shlex.quote(str(p))  # noqa: E731 (one-line quoting helper)
    heldout = run / "demo_world" / "heldout.jsonl"
    data = f"--qa={q(heldout)}" if heldout.is_file() else "--qa=QA.jsonl --beir=BEIR_DIR"
    return "\n".join(
        [
            "next steps with this run:",
            f"  evaluate: python -m grc_jax.evaluate --checkpoint={q(run)} --out={q(run / 'eval')} {data}",
            f"  serve:    python -m grc_jax.serve --model={q(run)}",
            f"  export:   python -m grc_jax.export --workdir={q(run)} --out={q(run / 'export')}",
            f"  logs:     {q(run / LOG_FILE)}",
        ]
    )
