"""One training step of a config with the weight matmuls' operands in float32 and in bfloat16
(`model.matmul_dtype`, sums in float32 either way), on the config's own batches.

    python benchmarks/train_step_bench.py --config=configs/smollm2_135m.py --workdir=runs/smollm2

The workdir holds the demo world and retention data the config trains on, or gets them as
`python -m grc_jax.train` builds them (minutes for retention data). Prints, for each operand
dtype, the seconds per step (median of --steps timed steps after a compiling one) and the
first step's loss, which should barely move.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import train  # noqa: E402
from grc_jax.data import pipeline  # noqa: E402
from grc_jax.tokenizer import literal_special_tokens  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_135m.py")
    parser.add_argument("--workdir", required=True, help="where the config's data is (or is built)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per dtype")
    args = parser.parse_args()
    config = load_config(args.config)
    setup, params = train.prepare(config, Path(args.workdir))
    if params is None:
        raise SystemExit(f"{args.config}: the benchmark starts from model.hf_path's weights; it names none")
    t = config.train
    dataset = pipeline.make_dataset(
        setup.train_files,
        literal_special_tokens(setup.tokenizer),
        setup.build,
        global_batch=t.global_batch,
        num_steps=args.steps + 1,
        seed=t.seed,
        block=0,
        blocks=1,
        mixture=setup.mixture,
    )
    iterator = iter(pipeline.make_iterator(dataset))
    batches = [jax.device_put(next(iterator)) for _ in range(args.steps + 1)]
    tx, schedule = train.make_optimizer(t)
    print(f"{args.config}: {t.global_batch} rows x {config.data.row_len} tokens, {jax.devices()[0].device_kind}")
    print(f"{'matmul_dtype':<13} {'s/step':>8} {'first loss':>11}")
    for dtype in ("float32", "bfloat16"):
        mc = dataclasses.replace(setup.model_config, matmul_dtype=dtype)
        step = jax.jit(
            functools.partial(train.train_step, model_config=mc, tx=tx, schedule=schedule, config=config),
            donate_argnums=0,
        )
        state = jax.jit(functools.partial(train.init_state, tx=tx, seed=t.seed))(params)
        state, metrics = step(state, batches[0])
        first_loss = float(metrics["loss"])
        times = []
        for batch in batches[1:]:
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        print(f"{dtype:<13} {statistics.median(times):8.2f} {first_loss:11.4f}", flush=True)
        del state


if __name__ == "__main__":
    main()
