"""The training run directory: the one place that knows its layout.

    RUN/model_config.json     ModelConfig fields
    RUN/tokenizer/            tokenizer.json (+ tokenizer_config.json), meta latent tokens included
    RUN/special_tokens.json   {"bos", "eos": [...], "pad", "eor"}: the tokens training used
    RUN/chat_template.jinja   the chat template of the model trained from (when it has one)
    RUN/checkpoints/<step>/   Orbax CheckpointManager steps; item `state` holds `params`

grc_jax.train writes it; Engine, evaluate and export read it. A run written before the tokens
were recorded has no special_tokens.json: its tokens are resolved from its tokenizer as the
training of that time did (grc_jax/special_tokens.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from grc_jax import special_tokens
from grc_jax.config import ModelConfig, read_json
from grc_jax.errors import UserError
from grc_jax.files import atomic_write_bytes
from grc_jax.special_tokens import SpecialTokens
from grc_jax.tokenizer import Tokenizer

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
SPECIAL_TOKENS_FILE = "special_tokens.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHECKPOINTS_DIR = "checkpoints"
RETENTION_DIR = "retention"  # the retention data training builds (data.retention)


@dataclasses.dataclass
class Run:
    config: ModelConfig
    params: Any  # model.Params
    tokenizer: Tokenizer
    special_tokens: SpecialTokens
    step: int


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))  # a kill mid-write leaves the previous file whole


def write_model_files(workdir: str | Path, config: ModelConfig, tokenizer: Tokenizer, tokens: SpecialTokens) -> None:
    """Everything besides the checkpoints, so that the run directory opens on its own."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_text(workdir / MODEL_CONFIG_FILE, json.dumps(dataclasses.asdict(config), indent=2))
    special_tokens.with_names(tokenizer, tokens).save(workdir / TOKENIZER_DIR)
    _write_text(workdir / SPECIAL_TOKENS_FILE, json.dumps(tokens.to_json(), indent=2))
    template = workdir / CHAT_TEMPLATE_FILE
    if tokens.chat_template is not None:
        _write_text(template, tokens.chat_template)
    else:
        template.unlink(missing_ok=True)


def read_model_config(workdir: str | Path) -> ModelConfig:
    path = Path(workdir) / MODEL_CONFIG_FILE
    fields = read_json(path)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
    if fields.get("rope_scaling"):
        fields["rope_scaling"] = tuple(tuple(pair) for pair in fields["rope_scaling"])
    return ModelConfig(**fields)


def read_tokenizer(workdir: str | Path) -> Tokenizer:
    return Tokenizer.from_dir(Path(workdir) / TOKENIZER_DIR)


def read_special_tokens(workdir: str | Path, tokenizer: Tokenizer) -> SpecialTokens:
    """The tokens the run trained with, and its chat template."""
    workdir = Path(workdir)
    template_file = workdir / CHAT_TEMPLATE_FILE
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    recorded = workdir / SPECIAL_TOKENS_FILE
    if not recorded.is_file():  # a run from before the tokens were recorded
        found = special_tokens.from_files(workdir / TOKENIZER_DIR, tokenizer)
        return dataclasses.replace(found, chat_template=template or found.chat_template)
    tokens = SpecialTokens.from_json(read_json(recorded), str(recorded), template)
    try:
        tokens.ids(tokenizer)
    except ValueError as e:
        raise ValueError(f"{recorded}: {e} at {workdir / TOKENIZER_DIR}") from None
    return tokens


def checkpoints_dir(workdir: str | Path) -> Path:
    return (Path(workdir) / CHECKPOINTS_DIR).absolute()


def saved_steps(workdir: str | Path) -> list[int]:
    """The finished checkpoints' steps, ascending (Orbax names a step being written otherwise)."""
    directory = Path(workdir) / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in directory.glob("*") if re.fullmatch(r"\d+", p.name))


def check_step(workdir: str | Path, step: int | None) -> None:
    """Raises UserError, naming `--step` and the steps there are, when `step` is given and the run
    has no finished checkpoint at it (the CLIs check before anything loads)."""
    if step is not None and step not in (saved := saved_steps(workdir)):
        raise UserError(f"--step={step}: {workdir} has checkpoints at steps {saved}")


def restore_params(workdir: str | Path, config: ModelConfig, step: int | None = None) -> tuple[Any, int]:
    """(params, step): the `params` of the `state` item, restored alone (no optimizer state) onto
    the default device; the latest step unless `step` is given."""
    import jax  # here, not at the top: listing steps or reading tokens must not start JAX
    import orbax.checkpoint as ocp

    from grc_jax import model

    checkpoints = checkpoints_dir(workdir)
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{Path(workdir) / CHECKPOINTS_DIR}: no checkpoints directory")
    manager = ocp.CheckpointManager(checkpoints)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{checkpoints}: no finished checkpoint")
        if step is None:
            step = manager.latest_step()
        elif step not in steps:
            raise ValueError(f"{checkpoints}: no step {step}; steps: {sorted(steps)}")
        abstract = {"params": model.param_shapes(config)}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
            ),
        )
    finally:
        manager.close()
    return restored["state"]["params"], int(step)


def open_run(workdir: str | Path, step: int | None = None) -> Run:
    """Everything needed to serve or export a run's checkpoint."""
    config = read_model_config(workdir)
    tokenizer = read_tokenizer(workdir)
    tokens = read_special_tokens(workdir, tokenizer)
    params, step = restore_params(workdir, config, step)
    return Run(config, params, tokenizer, tokens, step)
