"""Runs a training script or module with readers blind to memories in the first layer.

    python experiments/first_layer_blind.py experiments/name_match_probe.py --memories 2 ...
    python experiments/first_layer_blind.py -m grc_jax.train --config=configs/tiny.py --workdir=W

An experiment, not a feature: the method (docs/design.md section 2) lets a reader attend to every memory's latents in
every layer. In the first layer those latents' K/V are the same for every memory (the same K
token ids at the same positions P..P+K-1), so they carry nothing about their memory; a reader
there only sees M copies of one set of K keys, a sink whose weight grows with the number of
memories M and dilutes the reader's own tokens, which it must gather the asked name from. This
wrapper replaces `grc_jax.model.forward` (for GRC rows without `kv_index`) by the model's layer loop
with an attention whose first layer masks READER -> LATENT, to measure what that sink costs. Engine paths (retrieval,
decoding) keep the usual model, which they may: a lone segment or a reader without memories
computes the same either way.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import layout, model  # noqa: E402

_forward = model.forward


def forward(config, params, tokens, meta=None, **kwargs) -> model.ForwardOutput:
    if meta is None or kwargs.get("kv_index") is not None:
        return _forward(config, params, tokens, meta, **kwargs)
    mask = layout.attention_mask(meta)
    reader_to_latent = (meta.kind == layout.READER)[:, :, None] & (meta.kind == layout.LATENT)[:, None, :]

    def first_layer_blind(layer, q, k, v, carry):
        return model.attend(q, k, v, jnp.where(layer == 0, mask & ~reader_to_latent, mask)), carry, None

    cos, sin = model.rope_cos_sin(config, layout.positions(meta, config.max_segment_len, config.num_latents))
    x = model.embed_tokens(config, params, jnp.asarray(tokens))
    x = model.run_layers(config, params["layers"], x, cos, sin, first_layer_blind, remat=True)[0]
    hidden = model.rms_norm(x, params["final_norm"], config.rms_norm_eps)
    logits = model.lm_logits(config, params, hidden) if kwargs.get("compute_logits", True) else None
    return model.ForwardOutput(logits, hidden, None, None)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or (sys.argv[1] == "-m" and len(sys.argv) < 3):
        sys.exit(__doc__)
    model.forward = forward
    if sys.argv[1] == "-m":
        module, sys.argv = sys.argv[2], [sys.argv[2]] + sys.argv[3:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, sys.argv = sys.argv[1], sys.argv[1:]
        sys.path.insert(0, str(Path(script).resolve().parent))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
