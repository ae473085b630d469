"""GRC tuning of Llama-3-8B (or 3.1-8B, llama3 RoPE scaling) from a local HF directory, on a
TPU v5p-64 / v6e-64 pod slice or 8 nodes of 8 GPUs.

python -m grc_jax.train --config=configs/llama3_8b.py --config.model.hf_path=/ckpt/Meta-Llama-3.1-8B ...
"""

from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = "/path/to/Meta-Llama-3.1-8B"  # override on the command line; it fixes architecture and shapes
    c.model.num_latents = 16  # K meta latent tokens per segment: 512 / 16 = 32x compression
    c.model.max_segment_len = 512  # P, the longest segment of text
    c.model.param_dtype = "float32"  # float32 master weights for Adam
    c.model.dtype = "bfloat16"  # bfloat16 compute on the matrix units
    c.model.remat_policy = "full"  # recompute whole layers in the backward pass: activation memory at 8B
    c.data.row_len = 8192  # tokens per row
    c.data.max_segments_per_row = 64  # segments (texts and readers) one row may hold
    # Llama 3's own special tokens (it has no <s>/<pad>):
    c.data.bos_token = "<|begin_of_text|>"  # begins every text
    c.data.eos_token = "<|eot_id|>"  # ends a turn in Llama 3 Instruct's chat format
    c.data.pad_token = "<|finetune_right_pad_id|>"  # Llama 3.1's padding token
    c.data.eor_token = "<|reserved_special_token_0|>"  # an unused reserved token marks the end of reasoning
    c.train.steps = 5000  # the run's length in optimizer steps
    c.train.global_batch = 256  # rows per step
    c.train.learning_rate = 1e-5  # a pretrained model: a fine-tuning rate
    c.train.warmup_steps = 200  # linear warmup, then cosine decay
    c.mesh.data = 1  # no replicas: fsdp shards the batch as well as the parameters
    c.mesh.fsdp = -1  # every device left over after tensor
    c.mesh.tensor = 8  # 32 query heads, 8 KV heads
    c.checkpoint.every = 250  # steps between checkpoints
    c.eval_every = 1000  # a held-out evaluation every 1000 steps
    return c
