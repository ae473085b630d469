"""Every training setting and its default, in one locked ml_collections ConfigDict.

Config files (`configs/*.py`) start from `defaults()` and change values; since the dict is
locked, a mistyped key in a file or in a `--config.a.b=` flag fails at once, naming the
closest valid key.
"""
from __future__ import annotations

import difflib

import ml_collections
from ml_collections import config_dict

from grc_jax.config import ModelConfig


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        hf_path=config_dict.placeholder(str),  # start from a local HF checkpoint directory
        architecture="LlamaForCausalLM", hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, initializer_range=0.02, rope_theta=10000.0, tie_word_embeddings=True,
        qkv_bias=False, qk_norm=False,
        num_latents=8, max_segment_len=128, pooling="mean", embed_dim=config_dict.placeholder(int),
        param_dtype="float32", dtype="float32", scan_layers=True, remat_policy="none",
    ))
    c.data = ml_collections.ConfigDict(dict(
        train_files=config_dict.placeholder(str),  # comma-separated JSONL files or seqio:TASK[:SPLIT]; unset: the demo world
        seqio_modules="",  # comma-separated modules whose import registers the seqio tasks of train_files
        eval_dir=config_dict.placeholder(str),  # a demo-world style directory for held-out evaluation
        tokenizer=config_dict.placeholder(str),  # a directory with tokenizer.json (default: hf_path's)
        demo_world_seed=0, demo_world_entities=960, demo_world_heldout=48,
        row_len=512, max_segments_per_row=16, max_negatives=4, reader_distractors=4,
        reader_task="reconstruction", skip_malformed=False,
        bos_token="<s>", eos_token="</s>", eor_token="<|end_of_reasoning|>", pad_token="<pad>",
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, global_batch=16, grad_accum=1, seed=0,
        learning_rate=1e-3, warmup_steps=50, end_learning_rate_fraction=0.1, weight_decay=0.01,
        b1=0.9, b2=0.95, clip_norm=1.0,
        # Memory priors (GRC_DESIGN.md section 8, grc_jax/priors.py): every reader's question is
        # laid out as a segment too, and the reader's attention on memory m's keys gets
        # log_softmax_m(cos(question, memory m) / prior_temperature). Off: the one-pass forward
        # of today. On: a two-phase forward, about twice the step's compute. The temperature is
        # fixed (not learned), so the same value serves inference (Engine.generate's
        # prior_temperature, the held-out evaluation).
        memory_prior=False, prior_temperature=0.05,
    ))
    c.loss = ml_collections.ConfigDict(dict(gen=1.0, rep=1.0, comp=1.0, temperature=0.02))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=3, use_async=True))
    c.log_every = 20
    c.eval_every = 0  # 0: only at the end
    c.eval_max_queries = 200
    c.reasoning_max_tokens = 24
    c.lock()
    return c


# key -> its smallest valid value; ModelConfig checks the model's own values.
_AT_LEAST = {
    "train.steps": 1, "train.global_batch": 1, "train.grad_accum": 1, "train.warmup_steps": 0,
    "log_every": 1, "eval_every": 0, "eval_max_queries": 1, "reasoning_max_tokens": 1,
    "checkpoint.every": 1, "checkpoint.keep": 1, "data.row_len": 1, "data.max_segments_per_row": 1,
    "data.max_negatives": 0, "data.reader_distractors": 0,
}


def check_values(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming a setting whose value cannot work, before anything is built."""
    for key, least in _AT_LEAST.items():
        node = c
        for part in key.split("."):
            node = node[part]
        if node < least:
            raise ValueError(f"config: {key}={node} must be >= {least}")
    for axis, size in c.mesh.items():
        if size != -1 and size < 1:
            raise ValueError(f"config: mesh.{axis}={size} must be >= 1, or -1 for the devices left over")
    if c.train.prior_temperature <= 0:
        raise ValueError(f"config: train.prior_temperature={c.train.prior_temperature} must be > 0")
    if c.loss.temperature <= 0:
        raise ValueError(f"config: loss.temperature={c.loss.temperature} must be > 0")


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The ModelConfig a training config describes, for a model trained from scratch."""
    m = c.model
    fields = {k: m[k] for k in m if k != "hf_path"}
    return ModelConfig(vocab_size=vocab_size, **fields)


def find_unknown_override(argv: list[str], flag: str = "config") -> str | None:
    """The first `--config.a.b=v` flag whose key `defaults()` lacks, said with the closest keys."""
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        path = arg[len(flag) + 3:].split("=", 1)[0].split(".")
        node = defaults()
        for depth, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                prefix = ".".join(path[:depth])
                close = [f"{prefix}.{k}" if prefix else k for k in difflib.get_close_matches(key, siblings, n=3, cutoff=0.5)]
                hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys here: {', '.join(siblings)}"
                return f"unknown key {'.'.join(path)!r} in --{flag}.{'.'.join(path)}{hint}"
            node = node[key]
    return None


def check_keys(c: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None, prefix: str = "") -> None:
    """Raises ValueError for a key `defaults()` does not have, naming the closest valid ones."""
    reference = defaults() if reference is None else reference
    for key in c.keys():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + k for k in close)}?" if close else ""
            raise ValueError(f"config: unknown key {prefix + key!r}{hint}")
        if isinstance(c[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            check_keys(c[key], reference[key], prefix + key + ".")
