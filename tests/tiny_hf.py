"""Tiny random transformers models made on the fly, for parity tests (no network, no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 96

ARCH_CONFIGS = {
    "llama": dict(arch="LlamaForCausalLM", head_dim=8),
    "llama3_rope": dict(
        arch="LlamaForCausalLM",
        head_dim=8,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": dict(arch="Qwen2ForCausalLM", head_dim=8),
    "qwen2_tied": dict(arch="Qwen2ForCausalLM", head_dim=8, tie_word_embeddings=True),
    "qwen3": dict(arch="Qwen3ForCausalLM", head_dim=16),  # head_dim independent of hidden/heads
}


def make_hf_model(kind: str, out_dir: Path, seed: int = 0):
    """Builds a random tiny HF model of `kind`, saves it to out_dir, returns the torch model."""
    import torch
    import transformers

    spec = dict(ARCH_CONFIGS[kind])
    arch = spec.pop("arch")
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[arch]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        architectures=[arch],
        **spec,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # O(1) weights everywhere, biases and norms included, so parity means something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, tokens: np.ndarray, valid: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    import torch

    kwargs = {"attention_mask": torch.tensor(valid.astype(np.int64))}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(positions.astype(np.int64))
    with torch.no_grad():
        return model(torch.tensor(tokens.astype(np.int64)), **kwargs).logits.float().numpy()


def hf_last_hidden(model, tokens: np.ndarray) -> np.ndarray:
    """Final post-norm hidden states of one unpadded sequence, plain causal, positions 0..n-1."""
    import torch

    with torch.no_grad():
        return model.model(torch.tensor(tokens[None].astype(np.int64))).last_hidden_state[0].float().numpy()
