"""Training metrics: TensorBoard event files (no TensorFlow) and model FLOPs for MFU."""

from __future__ import annotations

from pathlib import Path

import jax

from grc_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (per chip for TPU), by a substring of `device_kind`.
_PEAK_FLOPS = (
    ("v6", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The device's peak, or None where it is unknown (the CPU): then no MFU is logged."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in _PEAK_FLOPS if name.lower() in kind.lower()), None)


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters, plus attention scores and values."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    head = c.hidden_size * c.total_vocab_size
    matmul_params = c.num_layers * (attn + mlp) + head
    attention = 2 * 2 * c.num_layers * seq_len * c.num_heads * c.head_dim  # QK^T and PV, forward
    return 6 * matmul_params + 3 * attention


def tensorboard_tag(name: str) -> str:
    """'recall@1' becomes 'recall_at_1' (MTEB's spelling): TensorBoard would turn '@' into '_'."""
    return name.replace("@", "_at_")


class MetricWriter:
    """Scalars to TensorBoard event files through tensorboardX (tags by `tensorboard_tag`); a no-op
    off process 0."""

    def __init__(self, logdir: str | Path, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(logdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(tensorboard_tag(name), float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
