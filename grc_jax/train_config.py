"""Every training setting and its default, in one locked ml_collections ConfigDict.

Config files (`configs/*.py`) start from `defaults()` and change values; since the dict is
locked, a mistyped key in a file or in a `--config.a.b=` flag fails at once, naming the
closest valid key. The model section's keys and defaults are ModelConfig's (grc_jax/config.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from grc_jax.config import ModelConfig, architecture_fields
from grc_jax.data.demo_world import MAX_ENTITIES as MAX_DEMO_WORLD_ENTITIES
from grc_jax.errors import UserError

# The model section is ModelConfig's fields (grc_jax/config.py) with ModelConfig's defaults: one list
# and one set of defaults. Where the two used to differ, ModelConfig's won (num_latents 16,
# max_segment_len 512, untied embeddings, a 64-wide model): it is what hf.load_pretrained, Engine and
# the tests build, and configs/*.py set the values they train with.
# Not keys: the tokenizer gives vocab_size, and only a checkpoint gives rope_scaling.
_NOT_KEYED = ("vocab_size", "rope_scaling")
# What a checkpoint fixes. Unset (None), these are ModelConfig's defaults for a model trained from
# scratch and the checkpoint's values with model.hf_path; set, they must agree with the checkpoint.
CHECKPOINT_FIELDS = (
    "architecture",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rms_norm_eps",
    "initializer_range",
    "rope_theta",
    "tie_word_embeddings",
)
# What the architecture fixes (config.architecture_fields): derived from model.architecture or the
# checkpoint's; a value set here must agree with it.
ARCHITECTURE_FIELDS = ("qkv_bias", "qk_norm")
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _model_section() -> ml_collections.ConfigDict:
    types = typing.get_type_hints(ModelConfig)
    section: dict[str, Any] = {"hf_path": config_dict.placeholder(str)}  # a local HF directory or .gguf to start from
    for field in dataclasses.fields(ModelConfig):
        if field.name in _NOT_KEYED:
            continue
        if field.name in CHECKPOINT_FIELDS + ARCHITECTURE_FIELDS or field.default is None:
            kind = next(t for t in typing.get_args(types[field.name]) or (types[field.name],) if t is not type(None))
            section[field.name] = config_dict.placeholder(kind)
        else:
            section[field.name] = field.default
    return ml_collections.ConfigDict(section)


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = _model_section()
    c.data = ml_collections.ConfigDict(
        dict(
            # comma-separated JSONL/ArrayRecord files or globs, or seqio:TASK[:SPLIT]; unset: the demo world
            train_files=config_dict.placeholder(str),
            # Instead of train_files, weighted sources "FILES:WEIGHT,FILES:WEIGHT" (FILES a file or glob); the
            # weights are the sources' shares of the records in the batches. ArrayRecord files and mixtures are
            # read lazily, each host only its share (grc_jax/data/streaming.py).
            mixture=config_dict.placeholder(str),
            seqio_modules="",  # comma-separated modules whose import registers the seqio tasks of train_files
            eval_dir=config_dict.placeholder(str),  # a demo-world style directory for held-out evaluation
            tokenizer=config_dict.placeholder(str),  # a directory with tokenizer.json (default: hf_path's)
            demo_world_seed=0,
            demo_world_entities=960,
            demo_world_heldout=48,
            # Which demo-world records train: "all", or "questions" (only the records that hold a
            # question: query, documents, question, answer; what trains reading and retrieval).
            demo_world_records="all",
            # Share of the rows drawn from retention data (grc_jax/data/retention.py: the base model's
            # own chat answers to general questions and standard-library docstring prose, half each),
            # built in WORKDIR/retention before training; it keeps a pretrained chat model a chat
            # model. Needs model.hf_path; the rest of the rows come from the training files (each
            # file an equal share) or the demo world. 0: none.
            retention=0.0,
            row_len=512,
            max_segments_per_row=16,
            max_negatives=4,
            reader_distractors=4,
            reader_task="reconstruction",
            skip_malformed=False,
            # Unset: from the model's files (generation_config.json, tokenizer_config.json; the demo
            # world's <s>, </s>, <pad>, <|end_of_reasoning|>); grc_jax/special_tokens.py says how.
            bos_token=config_dict.placeholder(str),
            eos_token=config_dict.placeholder(str),
            eor_token=config_dict.placeholder(str),
            pad_token=config_dict.placeholder(str),
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            global_batch=16,
            grad_accum=1,
            seed=0,
            learning_rate=1e-3,
            warmup_steps=50,
            end_learning_rate_fraction=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.95,
            clip_norm=1.0,
            # Memory priors (docs/design.md section 8, grc_jax/priors.py): every reader's question is
            # laid out as a segment too, and the reader's attention on memory m's keys gets
            # log_softmax_m(cos(question, memory m) / prior_temperature). Off: the one-pass forward
            # of today. On: a two-phase forward, about twice the step's compute. The temperature is
            # fixed (not learned), so the same value serves inference (Engine.generate's
            # prior_temperature, the held-out evaluation).
            memory_prior=False,
            prior_temperature=0.05,
        )
    )
    c.loss = ml_collections.ConfigDict(dict(gen=1.0, rep=1.0, comp=1.0, temperature=0.02))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=3, use_async=True))
    c.log_every = 20
    c.eval_every = 0  # 0: only at the end
    c.eval_max_queries = 200
    # How the held-out evaluation reads several memories: under memory priors (True), without
    # (False), or as the run trained (unset: train.memory_prior). Priors need no training to work
    # (docs/design.md section 8), so a run trained without them can be read with them.
    c.eval_memory_prior = config_dict.placeholder(bool)
    c.reasoning_max_tokens = 24
    # Set: the final checkpoint is exported there as an HF directory at the end (what
    # `python -m grc_jax.export --workdir=RUN --out=DIR` writes).
    c.export_dir = config_dict.placeholder(str)
    c.lock()
    return c


DEMO_WORLD_RECORDS = ("all", "questions")

# key -> its smallest valid value; ModelConfig checks the model's own values.
_AT_LEAST = {
    "train.steps": 1,
    "train.global_batch": 1,
    "train.grad_accum": 1,
    "train.warmup_steps": 0,
    "log_every": 1,
    "eval_every": 0,
    "eval_max_queries": 1,
    "reasoning_max_tokens": 1,
    "checkpoint.every": 1,
    "checkpoint.keep": 1,
    "data.row_len": 1,
    "data.max_segments_per_row": 1,
    "data.max_negatives": 0,
    "data.reader_distractors": 0,
}


# key -> (what a working value is, the test): real numbers whose wrong values still run (a negative
# learning rate trains by gradient ascent; b1 past 1 diverges), so each is checked by name.
_NUMBERS: dict[str, tuple[str, Any]] = {
    "train.learning_rate": ("> 0 and finite", lambda x: 0 < x < math.inf),
    "train.end_learning_rate_fraction": (">= 0 and finite", lambda x: 0 <= x < math.inf),
    "train.weight_decay": (">= 0 and finite", lambda x: 0 <= x < math.inf),
    "train.clip_norm": ("> 0 (inf: no clipping)", lambda x: x > 0),
    "train.b1": ("in [0, 1)", lambda x: 0 <= x < 1),
    "train.b2": ("in [0, 1)", lambda x: 0 <= x < 1),
    "loss.gen": (">= 0 and finite", lambda x: 0 <= x < math.inf),
    "loss.rep": (">= 0 and finite", lambda x: 0 <= x < math.inf),
    "loss.comp": (">= 0 and finite", lambda x: 0 <= x < math.inf),
    "loss.temperature": ("> 0 and finite", lambda x: 0 < x < math.inf),
    "train.prior_temperature": ("> 0 and finite", lambda x: 0 < x < math.inf),
    "model.rms_norm_eps": ("> 0 and finite", lambda x: 0 < x < math.inf),
    "model.rope_theta": ("> 0 and finite", lambda x: 0 < x < math.inf),
    "model.initializer_range": ("> 0 and finite", lambda x: 0 < x < math.inf),
}


def _value(c: ml_collections.ConfigDict, key: str) -> Any:
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def check_values(c: ml_collections.ConfigDict) -> None:
    """Raises UserError (a ValueError) naming a setting whose value cannot work, before anything
    is built."""
    for key, least in _AT_LEAST.items():
        node = _value(c, key)
        if node < least:
            raise UserError(f"config: {key}={node} must be >= {least}")
    for axis, size in c.mesh.items():
        if size != -1 and size < 1:
            raise UserError(f"config: mesh.{axis}={size} must be >= 1, or -1 for the devices left over")
    for key, (want, ok) in _NUMBERS.items():
        value = _value(c, key)
        if value is None:  # an unset model field: ModelConfig's default, or the checkpoint's
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
            raise UserError(f"config: {key}={value} must be {want}")
    if c.data.train_files is None and c.data.demo_world_entities > MAX_DEMO_WORLD_ENTITIES:
        raise UserError(
            f"config: data.demo_world_entities={c.data.demo_world_entities}: the demo world has at most "
            f"{MAX_DEMO_WORLD_ENTITIES} people (one per distinct attribute tuple)"
        )
    if c.data.train_files and c.data.mixture:
        raise UserError("config: give data.train_files or data.mixture, not both")
    if c.data.demo_world_records not in DEMO_WORLD_RECORDS:
        raise UserError(
            f"config: data.demo_world_records={c.data.demo_world_records!r} must be one of "
            + ", ".join(DEMO_WORLD_RECORDS)
        )
    if c.data.demo_world_records != "all" and (c.data.train_files or c.data.mixture):
        raise UserError(
            "config: data.demo_world_records chooses demo-world records; this run trains on data.train_files or "
            "data.mixture, not the demo world"
        )
    retention = c.data.retention
    if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0 <= retention < 1:
        raise UserError(f"config: data.retention={retention} must be in [0, 1)")
    if retention and not c.model.hf_path:
        raise UserError(
            "config: data.retention needs model.hf_path: the retention chat answers are the base model's own"
        )
    if retention and c.data.mixture:
        raise UserError(
            "config: data.retention mixes retention data into data.train_files or the demo world; with "
            "data.mixture, build it with `python -m grc_jax.data.retention MODEL --out DIR` and add its files"
        )


def set_model_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model section's ModelConfig fields that have a value (unset ones are None)."""
    return {k: v for k, v in c.model.items() if k != "hf_path" and v is not None}


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The ModelConfig a training config describes, for a model trained from scratch: the fields
    set, ModelConfig's defaults for the others, and what the architecture fixes derived from it."""
    fields = set_model_fields(c)
    architecture = fields.get("architecture", _MODEL_DEFAULTS["architecture"])
    for key, value in architecture_fields(architecture).items():
        if fields.setdefault(key, value) != value:
            raise UserError(
                f"config: model.{key}={fields[key]} does not fit model.architecture={architecture!r}, "
                f"which fixes {key}={value}; leave model.{key} unset"
            )
    try:
        return ModelConfig(vocab_size=vocab_size, **fields)
    except UserError as e:  # ModelConfig names its field; say the config's key
        raise UserError(f"config: model.{e}") from None


def check_checkpoint_fields(c: ml_collections.ConfigDict, checkpoint: ModelConfig, source: str) -> None:
    """Raises UserError naming a model.* key set to other than what the checkpoint at `source` has
    (its architecture and shapes, and what the architecture fixes)."""
    fields = set_model_fields(c)
    for key in CHECKPOINT_FIELDS + ARCHITECTURE_FIELDS:
        if key in fields and fields[key] != getattr(checkpoint, key):
            raise UserError(
                f"config: model.{key}={fields[key]!r}, but the checkpoint {source} has "
                f"{key}={getattr(checkpoint, key)!r}; leave model.{key} unset to take the checkpoint's"
            )


def find_unknown_override(argv: list[str], flag: str = "config") -> str | None:
    """The first `--config.a.b=v` flag whose key `defaults()` lacks, said with the closest keys."""
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        path = arg[len(flag) + 3 :].split("=", 1)[0].split(".")
        node = defaults()
        for depth, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                prefix = ".".join(path[:depth])
                close = [
                    f"{prefix}.{k}" if prefix else k for k in difflib.get_close_matches(key, siblings, n=3, cutoff=0.5)
                ]
                hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys here: {', '.join(siblings)}"
                return f"unknown key {'.'.join(path)!r} in --{flag}.{'.'.join(path)}{hint}"
            node = node[key]
    return None


def check_keys(
    c: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None, prefix: str = ""
) -> None:
    """Raises ValueError for a key `defaults()` does not have, naming the closest valid ones."""
    reference = defaults() if reference is None else reference
    for key in c.keys():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + k for k in close)}?" if close else ""
            raise ValueError(f"config: unknown key {prefix + key!r}{hint}")
        if isinstance(c[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            check_keys(c[key], reference[key], prefix + key + ".")
