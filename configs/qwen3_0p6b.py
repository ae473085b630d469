"""GRC tuning of Qwen3-0.6B from a local HF directory, on a TPU v5p-8/v6e-8 or an 8-GPU host.

python -m grc_jax.train --config=configs/qwen3_0p6b.py --config.model.hf_path=/ckpt/Qwen3-0.6B \
    --config.data.train_files=gs://.../train-*.jsonl --workdir=gs://.../runs/qwen3_0p6b
"""
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = "/path/to/Qwen3-0.6B"  # override on the command line
    c.model.num_latents = 16
    c.model.max_segment_len = 512
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "dots"
    c.data.row_len = 4096
    c.data.max_segments_per_row = 32
    # Qwen's tokenizer has no <s>/<pad>; these are its own special tokens.
    c.data.bos_token = "<|endoftext|>"
    c.data.eos_token = "<|im_end|>"
    c.data.pad_token = "<|endoftext|>"
    c.data.eor_token = "</think>"
    c.train.steps = 5000
    c.train.global_batch = 64
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 200
    c.loss.temperature = 0.02
    c.mesh.data = 1
    c.mesh.fsdp = -1  # all 8 chips/GPUs shard parameters and batch
    c.mesh.tensor = 1
    c.checkpoint.every = 500
    c.eval_every = 1000
    return c
