"""The built-in default: a ~0.5M-parameter model trained on the demo world, on a laptop CPU.

python -m grc_jax.train --config=configs/tiny.py

Sized for 8-10 minutes on 2 CPU cores, evaluation included: the same step's time varies by
about 20% from day to day on this project's machines, and 1200 steps keep the slower day under
10 minutes. Two layers: on the CPU they learn to answer from memory faster per second than
four (more, cheaper steps), and the layer loop is unrolled (XLA:CPU runs the unrolled step
about 10% faster than the scanned one; the parameters are the same stacked arrays). Qwen3's
q/k norms: with them the same steps learn the mentors that self-reasoning recalls (multi-hop
self-reasoning 0.111 against 0.000 plain, where the Llama layout got 0.019 against 0.037). Readers
train with 2 distractor memories (rows of 448 tokens); the held-out evaluation uses 4, read under
memory priors.
"""

from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.architecture = "Qwen3ForCausalLM"  # q/k norms (derived from the architecture; see above)
    c.model.hidden_size = 128  # the residual stream's width
    c.model.intermediate_size = 384  # 3x hidden, as Llama's MLPs
    c.model.num_layers = 2  # see above: two layers learn faster per second on the CPU than four
    c.model.scan_layers = False  # unrolled: about 10% faster on XLA:CPU, the same parameters
    c.model.num_heads = 4  # query heads
    c.model.num_kv_heads = 2  # grouped-query attention, 2 query heads per KV head
    c.model.head_dim = 32  # 4 heads x 32 = hidden_size
    c.model.tie_word_embeddings = True  # the output projection is the embedding: fewer parameters
    c.model.num_latents = 8  # K meta latent tokens per segment: 128 / 8 = 16x compression
    c.model.max_segment_len = 128  # the demo world's documents are 40-120 tokens
    c.data.row_len = 448  # 2-3 records of 150-200 tokens
    c.data.max_segments_per_row = 8  # segments (texts and readers) one row may hold
    c.data.max_negatives = 2  # negatives per query for the contrastive loss
    c.data.reader_distractors = 2  # see above: the held-out evaluation uses 4
    c.loss.temperature = 0.05  # 0.02 collapses early when training from scratch
    c.train.steps = 1200  # see above: under 10 minutes on the slower day
    c.train.global_batch = 8  # rows per step
    c.train.learning_rate = 2e-3  # 4e-3 collapses the contrastive loss
    c.train.warmup_steps = 30  # linear warmup, then cosine decay
    c.checkpoint.every = 400  # steps between checkpoints: 3 in the run
    c.log_every = 50  # steps between progress lines
    # The held-out evaluation reads several memories under memory priors (docs/design.md section
    # 8): trained without them (half the step time), read with them, 4 distractors cost nothing.
    c.eval_memory_prior = True
    return c
