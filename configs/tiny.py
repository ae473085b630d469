"""The built-in default: a ~1M-parameter model trained on the demo world, on a laptop CPU.

python -m grc_jax.train --config=configs/tiny.py

Sized for about 10 minutes on 2 CPU cores, evaluation included. Readers train with 2
distractor memories (rows of 448 tokens); the held-out evaluation uses 4.
"""
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.num_latents = 8
    c.model.max_segment_len = 128
    c.data.row_len = 448  # a multi-hop record with 2 negatives needs ~400 tokens
    c.data.max_segments_per_row = 8
    c.data.max_negatives = 2
    c.data.reader_distractors = 2
    c.loss.temperature = 0.05  # 0.02 collapses early when training from scratch
    c.train.steps = 480
    c.train.global_batch = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 30
    c.checkpoint.every = 200
    c.log_every = 25
    return c
