"""GRC tuning of Qwen3-4B from a local HF directory, on a TPU v5p-32 / v6e-32 pod slice.

python -m grc_jax.train --config=configs/qwen3_4b.py --config.model.hf_path=/ckpt/Qwen3-4B ...
(launch on every worker; see launch/)
"""
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = "/path/to/Qwen3-4B"
    c.model.num_latents = 16
    c.model.max_segment_len = 512
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.row_len = 4096
    c.data.max_segments_per_row = 32
    c.data.bos_token = "<|endoftext|>"
    c.data.eos_token = "<|im_end|>"
    c.data.pad_token = "<|endoftext|>"
    c.data.eor_token = "</think>"
    c.train.steps = 5000
    c.train.global_batch = 256
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 200
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 4  # 32 query heads, 8 KV heads: 4-way tensor parallelism divides both
    c.checkpoint.every = 500
    c.eval_every = 1000
    return c
