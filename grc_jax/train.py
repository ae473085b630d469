"""Unified GRC training: `python -m grc_jax.train --config=configs/tiny.py [--workdir=DIR]`.

One jitted step computes the generative, representative and compressive losses from one
forward pass over packed rows, on a (data, fsdp, tensor) mesh that spans every host.
Orbax checkpoints (async) hold the parameters, optimizer state, step, RNG and the data
iterator's position, so a killed run resumes with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from grc_jax import compile_cache, console, files, hf, losses, model, rundir, sharding, special_tokens, train_config
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world, pipeline, retention, seqio_source
from grc_jax.data.builder import BuildConfig
from grc_jax.errors import UserError, report_user_errors
from grc_jax.files import atomic_write_json
from grc_jax.metrics import MetricWriter, model_flops_per_token, peak_flops_per_device
from grc_jax.special_tokens import SpecialTokens
from grc_jax.tokenizer import Tokenizer, literal_special_tokens

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and exports go here (default: runs/<config name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several hosts.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")


class NonFiniteLoss(RuntimeError):
    """The run stopped before saving a bad step: a clean one-line error on the command line."""


@dataclasses.dataclass
class Setup:
    """What a run is made of, built once at start."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    train_files: list[str]
    eval_dir: str | None
    build: BuildConfig
    special_tokens: SpecialTokens = SpecialTokens()  # the tokens the run uses, and the chat template
    mixture: str | None = None  # weighted sources "FILES:WEIGHT,..." instead of train_files (data.mixture, retention)


def prepare(config: ml_collections.ConfigDict, workdir: Path) -> tuple[Setup, model.Params | None]:
    """Resolves data, tokenizer and model config; returns HF params when starting from HF."""
    d = config.data
    train_files = [f.strip() for f in (d.train_files or "").split(",") if f.strip()]
    if d.train_files is not None and not train_files:  # "" is a mistake, not a request for the demo world
        raise UserError(
            f"config: data.train_files={d.train_files!r} names no file; leave it unset to train on the "
            "generated demo world"
        )
    seqio_source.import_task_modules(d.seqio_modules)
    eval_dir = d.eval_dir
    tokenizer_dir = d.tokenizer or config.model.hf_path
    if not train_files and not d.mixture:
        world = workdir / "demo_world"
        if jax.process_index() == 0 and not (world / "world.json").is_file():
            demo_world.write_demo_world(
                str(world), seed=d.demo_world_seed, num_entities=d.demo_world_entities, num_heldout=d.demo_world_heldout
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("demo_world")
        train_files = [str(world / "train.jsonl")]
        if d.demo_world_records == "questions":
            train_files = [str(_question_records(world))]
        eval_dir = eval_dir or str(world)
        tokenizer_dir = tokenizer_dir or str(world)
    if not tokenizer_dir:
        raise UserError("config: data.tokenizer (or model.hf_path) must name a directory with tokenizer.json")
    if str(tokenizer_dir).endswith(".gguf"):  # a llama.cpp file carries its tokenizer in its metadata
        from grc_jax import gguf

        tokenizer = gguf.load_tokenizer(tokenizer_dir)
    else:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    mixture = d.mixture
    if d.retention:  # before the training weights load: the chat answers need the base model in memory
        fits = lambda text: len(tokenizer.encode(text)) + 2 <= d.row_len  # a text record is bos, text, eos
        built = _retention_files(config.model.hf_path, workdir / rundir.RETENTION_DIR, fits)
        rest = (1 - d.retention) / len(train_files)
        sources = [f"{f}:{rest}" for f in train_files] + [f"{path}:{d.retention / 2}" for path in built.values()]
        mixture, train_files = ",".join(sources), []
    params = None
    if config.model.hf_path:
        m = config.model
        # The checkpoint fixes the architecture and shapes: a model.* key that disagrees fails
        # before the weights load.
        train_config.check_checkpoint_fields(config, hf.read_checkpoint_config(m.hf_path), m.hf_path)
        model_config, params = hf.load_pretrained(
            m.hf_path,
            m.num_latents,
            max_segment_len=m.max_segment_len,
            pooling=m.pooling,
            embed_dim=m.embed_dim,
            param_dtype=m.param_dtype,
            dtype=m.dtype,
            matmul_dtype=m.matmul_dtype,
            scan_layers=m.scan_layers,
            remat_policy=m.remat_policy,
        )
    else:
        model_config = train_config.model_config(config, vocab_size=len(tokenizer))
    tokenizer = tokenizer.with_latents(model_config.num_latents, model_config.vocab_size)
    tokens = resolve_special_tokens(config, tokenizer, tokenizer_dir)

    def special(name: str) -> int:
        token = tokens.eos_token if name == "eos" else getattr(tokens, name)
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"config: data.{name}_token {token!r} is not in the tokenizer at {tokenizer_dir}")
        return token_id

    build = BuildConfig(
        max_segment_len=model_config.max_segment_len,
        num_latents=model_config.num_latents,
        latent_ids=tuple(tokenizer.latent_ids(model_config.num_latents)),
        row_len=d.row_len,
        max_segments_per_row=d.max_segments_per_row,
        max_negatives=d.max_negatives,
        reader_distractors=d.reader_distractors,
        reader_task=d.reader_task,
        bos_id=special("bos"),
        eos_id=special("eos"),
        eor_id=special("eor"),
        pad_id=special("pad"),
        question_segments=config.train.memory_prior,
    )
    return Setup(model_config, tokenizer, train_files, eval_dir, build, tokens, mixture), params


def _question_records(world: Path) -> Path:
    """WORLD/train_questions.jsonl: the demo world's training records that hold a question."""
    path = world / "train_questions.jsonl"
    if jax.process_index() == 0 and not path.is_file():
        lines = (world / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        questions = (x for x in lines if demo_world.record_kind(json.loads(x)) != "text")
        files.atomic_write_bytes(path, "".join(questions).encode())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("demo_world_questions")
    return path


def _retention_files(model_path: str, out: Path, fits: Callable[[str], bool]) -> dict[str, Path]:
    """The retention data of `model_path` in `out` (grc_jax/data/retention.py; texts that do not
    `fit` a row left out), built by this process in a one-process run; a multi-process run needs
    it built beforehand."""
    if jax.process_count() == 1:
        return retention.build(out, model_path, fits=fits)
    paths = {"chat": out / retention.CHAT_FILE, "prose": out / retention.PROSE_FILE}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"data.retention: {', '.join(missing)} missing; a multi-process run does not build them: run "
            f"`python -m grc_jax.data.retention {model_path} --out {out}` first"
        )
    return paths


def resolve_special_tokens(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer, tokenizer_dir: str
) -> SpecialTokens:
    """data.*_token where set, else what the model's files name (model.hf_path's generation and
    tokenizer configs, else the tokenizer directory's; grc_jax/special_tokens.py)."""
    d = config.data
    found = special_tokens.from_files(config.model.hf_path or tokenizer_dir, tokenizer)
    given = {name: d[f"{name}_token"] for name in special_tokens.NAMES if d[f"{name}_token"] is not None}
    if "eos" in given:  # the eos trained on goes first; the model's other eos tokens still end generation
        given["eos"] = (given["eos"], *(t for t in found.eos if t != given["eos"]))
    try:
        return special_tokens.for_training(found.override(**given))
    except ValueError as e:
        raise ValueError(f"config: {e} (model files: {config.model.hf_path or tokenizer_dir})") from None


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    warmup = max(t.warmup_steps, 1)  # optax needs a warmup and a decay of at least one step each
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, warmup, max(t.steps, warmup + 1), end_value=t.learning_rate * t.end_learning_rate_fraction
    )
    # No decay on norms and biases, by name: stacked layers give them a leading layers axis.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not str(path[-1].key).endswith(("norm", "bias")), params
    )
    tx = optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def init_state(params: model.Params, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "first_bad_step": jnp.full((), -1, jnp.int32),
    }


def train_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
):
    weights = {"gen": config.loss.gen, "rep": config.loss.rep, "comp": config.loss.comp}
    accum = config.train.grad_accum
    prior = config.train.prior_temperature if config.train.memory_prior else None
    if accum == 1:
        loss_fn = functools.partial(
            losses.grc_loss, model_config, weights=weights, temperature=config.loss.temperature, prior_temperature=prior
        )
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    else:
        # Micro-batches in a scan whose losses and gradients add up to the whole batch's: token
        # losses are over the whole batch's token counts; the contrastive loss is the mean of the
        # micro-batches' (each contrasts within its micro-batch).
        totals = {"gen": batch["gen_weight"].sum(), "comp": batch["comp_weight"].sum()}
        micro_weights = {**weights, "rep": weights["rep"] / accum}
        loss_fn = functools.partial(
            losses.grc_loss,
            model_config,
            weights=micro_weights,
            temperature=config.loss.temperature,
            token_totals=totals,
            prior_temperature=prior,
        )
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def body(acc, b):
            (_, m), g = grad_fn(state["params"], b)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        (_, first_metrics), first_grads = grad_fn(state["params"], jax.tree.map(lambda x: x[0], micro))
        (grads, metrics), _ = jax.lax.scan(body, (first_grads, first_metrics), jax.tree.map(lambda x: x[1:], micro))
        # Summed: the losses (rep weighted 1/accum in each) and token counts; averaged: rep's own figures.
        metrics = {k: v / accum if k in ("loss_rep", "rep_accuracy") else v for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    bad = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))
    # A non-finite step is not applied; the host stops the run at its next check.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)
    step = state["step"]
    new_state = {
        "step": step + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "rng": state["rng"],
        "first_bad_step": jnp.where((state["first_bad_step"] < 0) & bad, step, state["first_bad_step"]),
    }
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(step)}
    return new_state, metrics


def _to_global(
    batch: dict[str, np.ndarray], batch_sharding: jax.sharding.NamedSharding, global_batch: int
) -> dict[str, jax.Array]:
    # The global shape must be given: processes that share rows (tensor across hosts) hold copies.
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, v, (global_batch, *v.shape[1:]))
        for k, v in batch.items()
    }


def _put(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every host) onto their global shardings."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree, shardings
    )


class _Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.requested = False

    def agreed(self, sync: bool) -> bool:
        """Whether any process got SIGTERM. Every process must stop at the same step: a save
        is a collective, and one process saving while the others train deadlocks them. With
        several processes they agree only where `sync` (a log or checkpoint step, where the host
        waits for the device anyway), so other steps keep the host ahead of the device."""
        if jax.process_count() == 1:
            return self.requested
        return sync and bool(multihost_utils.process_allgather(np.int32(self.requested)).max())

    def __enter__(self) -> "_Preemption":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint) and returns the final metrics."""
    from grc_jax.eval import world as evaluation  # imports the inference stack: only when evaluating

    train_config.check_keys(config)
    train_config.check_values(config)
    compile_cache.enable()  # JAX's persistent compilation cache (grc_jax/compile_cache.py; GRC_JAX_CACHE_DIR=off)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup, hf_params = prepare(config, workdir)
    if setup.eval_dir and jax.process_count() > 1:
        logging.warning(
            "held-out evaluation runs in single-process runs only; evaluate the checkpoint with "
            "python -m grc_jax.evaluate"
        )
        setup.eval_dir = None
    mc, t = setup.model_config, config.train
    try:
        mesh = sharding.make_mesh(config.mesh.to_dict())
    except ValueError as e:  # the mesh does not fit the devices: a setting, said in one line
        raise UserError(str(e)) from None
    rules = sharding.DEFAULT_RULES
    if t.global_batch % (mesh.shape["data"] * mesh.shape["fsdp"] * t.grad_accum):
        raise UserError(
            f"config: train.global_batch={t.global_batch} must divide by data*fsdp*grad_accum "
            f"= {mesh.shape['data'] * mesh.shape['fsdp'] * t.grad_accum}"
        )
    data = data_settings(config, setup.train_files)
    saved = check_resume(workdir, config, mc, setup.tokenizer, data)
    if saved is not None and saved == t.steps:
        return _already_trained(workdir, saved)
    if jax.process_index() == 0:
        rundir.write_model_files(workdir, mc, setup.tokenizer, setup.special_tokens)
        atomic_write_json(workdir / DATA_SETTINGS_FILE, data, indent=2)

    tx, schedule = make_optimizer(t)
    param_shardings = sharding.logical_to_sharding(model.param_logical_axes(mc), model.param_shapes(mc), mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _Preemption() as preemption:
        if hf_params is None:
            params = jax.jit(lambda k: model.init_params(mc, k), out_shardings=param_shardings)(jax.random.key(t.seed))
        else:
            params = _put(hf_params, param_shardings)
        state = jax.jit(functools.partial(init_state, tx=tx, seed=t.seed))(params)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = jax.jit(
            functools.partial(train_step, model_config=mc, tx=tx, schedule=schedule, config=config),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )

        block, blocks = sharding.host_batch_block(batch_sharding, t.global_batch)
        dataset = pipeline.make_dataset(
            setup.train_files,
            literal_special_tokens(setup.tokenizer),
            setup.build,
            global_batch=t.global_batch,
            num_steps=t.steps,
            seed=t.seed,
            block=block,
            blocks=blocks,
            skip_malformed=config.data.skip_malformed,
            mixture=setup.mixture,
        )
        iterator = pipeline.make_iterator(dataset)
        manager = ocp.CheckpointManager(
            rundir.checkpoints_dir(workdir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.checkpoint.keep, enable_async_checkpointing=config.checkpoint.use_async
            ),
        )
        start = manager.latest_step()
        if start is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            try:
                restored = manager.restore(
                    start,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
                )
            except Exception as e:  # a truncated or damaged step: say which, and what else there is
                raise _unreadable_checkpoint(workdir, start, sorted(manager.all_steps()), e) from e
            state = restored["state"]
            iterator.set_state(restored["data"])
            logging.info("resumed from step %d", start)
        start = start or 0

        writer = MetricWriter(workdir / "tb", enabled=jax.process_index() == 0)
        flops_per_token = model_flops_per_token(mc, config.data.row_len)
        peak = peak_flops_per_device()
        tokens_per_step = t.global_batch * config.data.row_len

        def save(step: int) -> None:
            _check_finite(state)
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())
                ),
                force=True,
            )
            if jax.process_index() == 0:
                print(console.checkpoint_line(step, workdir / "checkpoints" / str(step)), flush=True)

        history: list[dict[str, float]] = []
        evals: list[dict[str, float]] = []  # the periodic held-out evaluations, the final one apart
        window_start, window_steps, run_start = time.perf_counter(), 0, time.perf_counter()
        try:
            for step in range(start, t.steps):
                batch = _to_global(next(iterator), batch_sharding, t.global_batch)
                state, metrics = step_fn(state, batch)
                window_steps += 1
                done = step + 1
                if done % config.log_every == 0 or done == t.steps:
                    _check_finite(state)
                    metrics = jax.tree.map(float, jax.device_get(metrics))
                    elapsed = time.perf_counter() - window_start
                    step_time = elapsed / window_steps
                    metrics.update(step_time=step_time, tokens_per_second=tokens_per_step / step_time)
                    if peak:
                        metrics["mfu"] = flops_per_token * tokens_per_step / step_time / (peak * jax.device_count())
                    writer.write(done, metrics)
                    history.append({"step": done, **metrics})
                    _report(done, t.steps, metrics, eta=(t.steps - done) * step_time)
                    window_start, window_steps = time.perf_counter(), 0
                if config.eval_every and done % config.eval_every == 0 and done != t.steps and setup.eval_dir:
                    figures = evaluation.evaluate_world(
                        mc, state["params"], setup, config, memory_prior=config.eval_memory_prior
                    )
                    writer.write(done, figures)
                    evals.append({"step": done, **figures})
                    _print_eval(done, figures)
                if done % config.checkpoint.every == 0 or done == t.steps:
                    save(done)
                synced = done % config.log_every == 0 or done % config.checkpoint.every == 0
                if preemption.agreed(synced) or manager.reached_preemption(done):
                    if manager.latest_step() != done:
                        save(done)
                    manager.wait_until_finished()
                    logging.warning("stopped for preemption at step %d", done)
                    return {"preempted_at": done, "history": history}
        except BaseException:
            # A checkpoint still being written when a step fails (a bad record met mid-stream, a
            # non-finite loss, ^C) is finished first: exiting would abandon it half-written, and the
            # run could only restart from the one before.
            manager.wait_until_finished()
            raise
        manager.wait_until_finished()
        result: dict[str, Any] = {"history": history, "train_seconds": time.perf_counter() - run_start}
        if evals:
            result["evals"] = evals
        if setup.eval_dir and start < t.steps:
            result["eval"] = evaluation.evaluate_world(
                mc, state["params"], setup, config, memory_prior=config.eval_memory_prior
            )
            writer.write(t.steps, result["eval"])
            _print_eval(t.steps, result["eval"])
        writer.close()
        if jax.process_index() == 0:
            atomic_write_json(workdir / "result.json", result, indent=2)  # a kill mid-write keeps the previous one
        if config.export_dir:
            _export(setup, state["params"], config.export_dir)
        return result


def _export(setup: Setup, params: model.Params, out_dir: str) -> None:
    """The final parameters as an HF directory (config export_dir), with the run's tokenizer,
    special tokens and chat template: what `python -m grc_jax.export` writes from the checkpoint."""
    if jax.process_count() > 1:  # every process takes part in the gather; process 0 writes
        params = multihost_utils.process_allgather(params, tiled=True)
    else:
        params = jax.device_get(params)
    if jax.process_index() == 0:
        out = hf.save_pretrained(
            setup.model_config, params, out_dir, setup.tokenizer, special_tokens=setup.special_tokens
        )
        print(f"exported the final parameters to {out}", flush=True)


DATA_SETTINGS_FILE = "data_settings.json"
# ModelConfig fields a resume may change: they do not change the saved arrays.
_RESUMABLE_MODEL_FIELDS = ("dtype", "matmul_dtype", "scan_layers", "remat_policy")


def data_settings(config: ml_collections.ConfigDict, train_files: list[str]) -> dict[str, Any]:
    """What fixes the sequence of batches: a resume must have the same, or its data iterator's
    saved position means another batch."""
    d, t = config.data, config.train
    files = (
        None
        if d.train_files is None
        else [f if seqio_source.is_seqio_source(f) else str(Path(f).resolve()) for f in train_files]
    )
    settings = {
        "train_files": files,
        "seed": t.seed,
        "global_batch": t.global_batch,
        "skip_malformed": d.skip_malformed,
        "row_len": d.row_len,
        "max_segments_per_row": d.max_segments_per_row,
        "max_negatives": d.max_negatives,
        "reader_distractors": d.reader_distractors,
        "reader_task": d.reader_task,
    }
    if files is None:
        settings.update(
            demo_world_seed=d.demo_world_seed,
            demo_world_entities=d.demo_world_entities,
            demo_world_heldout=d.demo_world_heldout,
        )
    # Recorded only when set, so that runs from before these keys existed still resume.
    for key, unset in (("mixture", None), ("demo_world_records", "all"), ("retention", 0.0)):
        if d[key] != unset:
            settings[key] = d[key]
    return settings


def check_resume(
    workdir: Path,
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    data: dict[str, Any],
) -> int | None:
    """The step a run on `workdir` resumes from (None: a new run), after checking that the
    workdir's checkpoints are of this model, tokenizer and data, and that `train.steps` reaches
    them. Raises UserError naming what differs; nothing is written."""
    steps = rundir.saved_steps(workdir)
    if not steps:
        return None
    latest = steps[-1]
    where = f"{workdir} holds checkpoints up to step {latest}"
    hint = "rerun with the settings it was trained with, or give a new --workdir"
    saved_model = workdir / "model_config.json"
    if saved_model.is_file():
        before = json.loads(saved_model.read_text(encoding="utf-8"))
        now = json.loads(json.dumps(dataclasses.asdict(model_config)))
        differ = [
            k
            for k in sorted(set(before) | set(now))
            if k not in _RESUMABLE_MODEL_FIELDS and before.get(k) != now.get(k)
        ]
        if differ:
            raise UserError(
                f"{where} of another model: "
                + ", ".join(f"{k} {before.get(k)!r} there, {now.get(k)!r} now" for k in differ)
                + f"; {hint}"
            )
    saved_tokenizer = workdir / "tokenizer" / "tokenizer.json"
    if saved_tokenizer.is_file():
        vocab = Tokenizer.from_dir(saved_tokenizer.parent).inner.get_vocab(with_added_tokens=True)
        if vocab != tokenizer.inner.get_vocab(with_added_tokens=True):
            raise UserError(f"{where} trained with another tokenizer ({saved_tokenizer}); {hint}")
    saved_data = workdir / DATA_SETTINGS_FILE
    if saved_data.is_file():
        before = json.loads(saved_data.read_text(encoding="utf-8"))
        differ = [k for k in sorted(set(before) | set(data)) if before.get(k) != data.get(k)]
        if differ:
            raise UserError(
                f"{where} trained on other data settings, so its saved data position is not the next "
                "batch of these: "
                + ", ".join(f"{k} {before.get(k)!r} there, {data.get(k)!r} now" for k in differ)
                + f"; {hint}"
            )
    if config.train.steps < latest:
        raise UserError(
            f"config: train.steps={config.train.steps} is below step {latest}, the last one saved in "
            f"{workdir / 'checkpoints'}; raise train.steps to train on, or give a new --workdir"
        )
    return latest


def _already_trained(workdir: Path, step: int) -> dict[str, Any]:
    """A rerun of a finished run: its results stay as they are."""
    result_file = workdir / "result.json"
    print(
        f"{workdir} is already trained to step {step} (train.steps); its results are in {result_file}. "
        "Raise train.steps to train on, or evaluate it with python -m grc_jax.evaluate.",
        flush=True,
    )
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    return {"history": [], "already_trained": step}


def _unreadable_checkpoint(workdir: Path, step: int, steps: list[int], error: Exception) -> UserError:
    earlier = [s for s in steps if s < step]
    first = " ".join(str(error).split())[:300]
    offer = (
        f"move it aside to resume from step {earlier[-1]}, the one before" if earlier else "move it aside to start over"
    )
    return UserError(
        f"{workdir / 'checkpoints' / str(step)}: the checkpoint of step {step} cannot be read "
        f"(truncated or damaged? {type(error).__name__}: {first}); {offer}"
    )


def _check_finite(state: dict[str, Any]) -> None:
    bad = int(jax.device_get(state["first_bad_step"]))
    if bad >= 0:
        raise NonFiniteLoss(
            f"non-finite loss or gradient at step {bad + 1}; stopping. The last checkpoint "
            f"before it is untouched; lower train.learning_rate or check the data."
        )


def _report(step: int, total: int, m: dict[str, float], eta: float) -> None:
    mfu = f" | mfu {m['mfu']:.1%}" if "mfu" in m else ""
    print(
        f"step {step}/{total} | loss {m['loss']:.3f} (gen {m['loss_gen']:.3f} rep {m['loss_rep']:.3f} "
        f"comp {m['loss_comp']:.3f}) | rep acc {m['rep_accuracy']:.2f} | lr {m['learning_rate']:.2e} "
        f"| gnorm {m['grad_norm']:.2f} | {m['tokens_per_second']:,.0f} tok/s | {m['step_time']:.2f} s/step"
        f"{mfu} | ETA {int(eta // 60)}m{int(eta % 60):02d}s",
        flush=True,
    )


def _print_eval(step: int, figures: dict[str, float]) -> None:
    print(f"held-out evaluation at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    workdir = _WORKDIR.value or str(Path("runs") / Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem)
    console.setup_logging(workdir, _PROCESS_ID.value)  # library INFO logs to WORKDIR/train.log
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = report_user_errors(train_and_evaluate, extra=(NonFiniteLoss,))(config, workdir)
    if jax.process_index() == 0:
        print(console.summary(workdir, result) + "\n" + console.next_steps(workdir), flush=True)


def _one_line(e: Exception) -> str:
    """ml_collections' locked-config error without its dump of every other field."""
    while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], Exception):
        e = e.args[0]  # an AttributeError wrapping the KeyError
    message = " ".join(str(e.args[0] if e.args else e).split())
    return re.sub(r" Other fields present: .*?(?= Did you mean|$)", "", message)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with config errors (unknown keys, bad values) as one clean line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown key
        problem = train_config.find_unknown_override(argv) or _one_line(e)
        raise SystemExit(f"config error: {problem}") from None
    except (flags.Error, OSError, TypeError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
