"""Export a training run's checkpoint as an HF directory:
`python -m grc_jax.export --workdir=RUN [--step=N] --out=DIR`.

The directory (grc_jax.hf.save_pretrained) opens in transformers' AutoModelForCausalLM with no
custom code and in `Engine.from_pretrained`, with the run's special tokens and chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grc_jax import rundir
from grc_jax.errors import report_user_errors


def export_run(workdir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Writes the run's checkpoint at `step` (default: the latest) to `out_dir`; returns it."""
    from grc_jax import hf

    run = rundir.open_run(workdir, step)
    return hf.save_pretrained(run.config, run.params, out_dir, run.tokenizer, special_tokens=run.special_tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grc_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, metavar="RUN", help="a training run directory (grc_jax.train's)")
    p.add_argument("--step", type=int, help="the checkpoint step to export (default: the latest)")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the HF directory to write (new, empty, or an earlier export, which is replaced whole)",
    )
    return p


def _export(args: argparse.Namespace) -> Path:
    if not rundir.is_run_dir(args.workdir):
        raise FileNotFoundError(f"{args.workdir}: not a training run directory (no {rundir.MODEL_CONFIG_FILE})")
    rundir.check_step(args.workdir, args.step)
    out = export_run(args.workdir, args.out, args.step)
    print(f"exported {args.workdir} to {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    # a user error's message names the file or flag; a traceback would bury it
    return report_user_errors(_export, extra=(OSError, ValueError))(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
