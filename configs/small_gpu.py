"""From scratch on one GPU: a ~100M-parameter model on the demo world (or your JSONL files).

python -m grc_jax.train --config=configs/small_gpu.py --config.data.train_files=a.jsonl,b.jsonl \
    --config.data.tokenizer=DIR_WITH_TOKENIZER_JSON --config.data.eval_dir=DEMO_WORLD_STYLE_DIR
"""

from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.architecture = "Qwen3ForCausalLM"  # q/k norms (derived from the architecture), as configs/tiny.py
    c.model.hidden_size = 768  # the residual stream's width
    c.model.intermediate_size = 2048  # about 8/3 x hidden, as Llama's MLPs
    c.model.num_layers = 12  # decoder layers
    c.model.num_heads = 12  # query heads
    c.model.num_kv_heads = 4  # grouped-query attention, 3 query heads per KV head
    c.model.head_dim = 64  # 12 heads x 64 = hidden_size
    c.model.tie_word_embeddings = True  # the output projection is the embedding, as configs/tiny.py
    c.model.num_latents = 16  # K meta latent tokens per segment: 512 / 16 = 32x compression
    c.model.max_segment_len = 512  # P, the longest segment of text
    c.model.param_dtype = "float32"  # float32 master weights for Adam
    c.model.dtype = "bfloat16"  # bfloat16 compute on the GPU's tensor cores
    c.model.remat_policy = "dots"  # keep matmul outputs, recompute the rest in the backward pass
    c.data.row_len = 2048  # tokens per row
    c.data.max_segments_per_row = 24  # segments (texts and readers) one row may hold
    c.data.demo_world_entities = 2000  # a larger demo world for the larger model
    c.train.steps = 20000  # the run's length in optimizer steps
    c.train.global_batch = 32  # rows per step
    c.train.learning_rate = 6e-4  # a from-scratch rate for ~100M parameters
    c.train.warmup_steps = 500  # linear warmup, then cosine decay
    c.checkpoint.every = 1000  # steps between checkpoints
    c.log_every = 50  # steps between progress lines
    c.eval_every = 2000  # a held-out evaluation every 2000 steps
    return c
