"""Export a training run's checkpoint as an HF directory:
`python -m grc_jax.export --workdir=RUN [--step=N] --out=DIR`.

The directory (grc_jax.hf.save_pretrained) opens in transformers' AutoModelForCausalLM with no
custom code and in `Engine.from_pretrained`, with the run's special tokens and chat template.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grc_jax import rundir


def export_run(workdir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Writes the run's checkpoint at `step` (default: the latest) to `out_dir`; returns it."""
    from grc_jax import hf

    run = rundir.open_run(workdir, step)
    return hf.save_pretrained(run.config, run.params, out_dir, run.tokenizer, special_tokens=run.special_tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grc_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, metavar="RUN", help="a training run directory (grc_jax.train's)")
    p.add_argument("--step", type=int, help="the checkpoint step to export (default: the latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="the HF directory to write (new, empty, or an "
                                                                "earlier export, which is replaced whole)")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        if not rundir.is_run_dir(args.workdir):
            raise FileNotFoundError(f"{args.workdir}: not a training run directory (no {rundir.MODEL_CONFIG_FILE})")
        if args.step is not None and args.step not in rundir.saved_steps(args.workdir):
            raise ValueError(f"--step={args.step}: {args.workdir} has checkpoints at steps "
                             f"{rundir.saved_steps(args.workdir)}")
        out = export_run(args.workdir, args.out, args.step)
    except (OSError, ValueError) as e:  # the message names the file or flag; a traceback would bury it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {args.workdir} to {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
