"""GRC tuning of Llama-3-8B (or 3.1-8B, llama3 RoPE scaling) from a local HF directory, on a
TPU v5p-64 / v6e-64 pod slice or 8 nodes of 8 GPUs.

python -m grc_jax.train --config=configs/llama3_8b.py --config.model.hf_path=/ckpt/Meta-Llama-3.1-8B ...
"""
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = "/path/to/Meta-Llama-3.1-8B"
    c.model.num_latents = 16
    c.model.max_segment_len = 512
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.row_len = 8192
    c.data.max_segments_per_row = 64
    c.data.bos_token = "<|begin_of_text|>"
    c.data.eos_token = "<|eot_id|>"
    c.data.pad_token = "<|finetune_right_pad_id|>"
    c.data.eor_token = "<|reserved_special_token_0|>"
    c.train.steps = 5000
    c.train.global_batch = 256
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 200
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 8  # 32 query heads, 8 KV heads
    c.checkpoint.every = 250
    c.eval_every = 1000
    return c
