"""GRC tuning of Qwen3-0.6B from a local HF directory, on a TPU v5p-8/v6e-8 or an 8-GPU host.

python -m grc_jax.train --config=configs/qwen3_0p6b.py --config.model.hf_path=/ckpt/Qwen3-0.6B \
    --config.data.train_files=gs://.../train-*.jsonl --workdir=gs://.../runs/qwen3_0p6b
"""

from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = "/path/to/Qwen3-0.6B"  # override on the command line; it fixes architecture and shapes
    c.model.num_latents = 16  # K meta latent tokens per segment: 512 / 16 = 32x compression
    c.model.max_segment_len = 512  # P, the longest segment of text
    c.model.param_dtype = "float32"  # float32 master weights for Adam
    c.model.dtype = "bfloat16"  # bfloat16 compute on the matrix units
    c.model.remat_policy = "dots"  # keep matmul outputs, recompute the rest (cheaper than "full")
    c.data.row_len = 4096  # tokens per row
    c.data.max_segments_per_row = 32  # segments (texts and readers) one row may hold
    # Qwen's tokenizer has no <s>/<pad>; these are its own special tokens.
    c.data.bos_token = "<|endoftext|>"  # begins every text
    c.data.eos_token = "<|im_end|>"  # ends a turn in Qwen's chat format
    c.data.pad_token = "<|endoftext|>"  # Qwen pads with its end-of-text token
    c.data.eor_token = "</think>"  # Qwen3's own end of reasoning
    c.train.steps = 5000  # the run's length in optimizer steps
    c.train.global_batch = 64  # rows per step
    c.train.learning_rate = 2e-5  # a pretrained model: a fine-tuning rate
    c.train.warmup_steps = 200  # linear warmup, then cosine decay
    c.loss.temperature = 0.02  # the InfoNCE temperature, the default (from scratch, configs/tiny.py needs 0.05)
    c.mesh.data = 1  # no replicas: fsdp shards the batch as well as the parameters
    c.mesh.fsdp = -1  # all 8 chips/GPUs shard parameters and batch
    c.mesh.tensor = 1  # a 0.6B model needs no tensor parallelism
    c.checkpoint.every = 500  # steps between checkpoints
    c.eval_every = 1000  # a held-out evaluation every 1000 steps
    return c
