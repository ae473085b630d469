"""GRC tuning of Qwen3-4B from a local HF directory, on a TPU v5p-32 / v6e-32 pod slice.

python -m grc_jax.train --config=configs/qwen3_4b.py --config.model.hf_path=/ckpt/Qwen3-4B ...
(launch on every worker; see launch/)
"""

from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = "/path/to/Qwen3-4B"  # override on the command line; it fixes architecture and shapes
    c.model.num_latents = 16  # K meta latent tokens per segment: 512 / 16 = 32x compression
    c.model.max_segment_len = 512  # P, the longest segment of text
    c.model.param_dtype = "float32"  # float32 master weights for Adam
    c.model.dtype = "bfloat16"  # bfloat16 compute on the matrix units
    c.model.remat_policy = "full"  # recompute whole layers in the backward pass: activation memory at 4B
    c.data.row_len = 4096  # tokens per row
    c.data.max_segments_per_row = 32  # segments (texts and readers) one row may hold
    # Qwen's tokenizer has no <s>/<pad>; these are its own special tokens.
    c.data.bos_token = "<|endoftext|>"  # begins every text
    c.data.eos_token = "<|im_end|>"  # ends a turn in Qwen's chat format
    c.data.pad_token = "<|endoftext|>"  # Qwen pads with its end-of-text token
    c.data.eor_token = "</think>"  # Qwen3's own end of reasoning
    c.train.steps = 5000  # the run's length in optimizer steps
    c.train.global_batch = 256  # rows per step
    c.train.learning_rate = 1e-5  # a pretrained model: a fine-tuning rate
    c.train.warmup_steps = 200  # linear warmup, then cosine decay
    c.mesh.data = 1  # no replicas: fsdp shards the batch as well as the parameters
    c.mesh.fsdp = -1  # every device left over after tensor
    c.mesh.tensor = 4  # 32 query heads, 8 KV heads: 4-way tensor parallelism divides both
    c.checkpoint.every = 500  # steps between checkpoints
    c.eval_every = 1000  # a held-out evaluation every 1000 steps
    return c
