"""From scratch on one GPU: a ~100M-parameter model on the demo world (or your JSONL files).

python -m grc_jax.train --config=configs/small_gpu.py --config.data.train_files=a.jsonl,b.jsonl \
    --config.data.tokenizer=DIR_WITH_TOKENIZER_JSON --config.data.eval_dir=DEMO_WORLD_STYLE_DIR
"""
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.architecture = "Qwen3ForCausalLM"  # q/k norms, as configs/tiny.py
    c.model.qk_norm = True
    c.model.hidden_size = 768
    c.model.intermediate_size = 2048
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.num_kv_heads = 4
    c.model.head_dim = 64
    c.model.num_latents = 16
    c.model.max_segment_len = 512
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "dots"
    c.data.row_len = 2048
    c.data.max_segments_per_row = 24
    c.data.demo_world_entities = 2000
    c.train.steps = 20000
    c.train.global_batch = 32
    c.train.learning_rate = 6e-4
    c.train.warmup_steps = 500
    c.checkpoint.every = 1000
    c.log_every = 50
    c.eval_every = 2000
    return c
