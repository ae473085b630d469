"""Evaluate a GRC model: `python -m grc_jax.evaluate (--checkpoint=RUN_DIR | --hf=DIR) --out=DIR ...`.

Tasks (`--task`, a comma list; `all` runs every task whose inputs are given):

- retrieval (`--beir=DIR`, repeatable): nDCG@10, recall@1/10/100 and MRR by pytrec_eval, with
  plain and self-reasoned (`reason=True`) query embeddings; BEIR directories as described in
  grc_jax/eval/data.py, with optional per-query `excluded_ids` in queries.jsonl (BRIGHT);
- memory_qa (`--qa=FILE`): answers from compressed memories (the positive among distractors),
  from the same documents as text, and from no context; SQuAD exact match and token F1; the
  compression ratio (document tokens / memory slots);
- generation (`--generation=FILE`, repeatable): exact match of GSM8K-style final answers;
- latency (inputs of memory_qa, else of generation): time to first token, tokens/s and KV
  bytes per mode; time per embedding, self-reasoned embedding and compression;
- perplexity (`--text=FILE`, repeatable; plain UTF-8 text, or JSONL with a `text` field): the plain
  language model's perplexity and NLL per token over non-overlapping windows of `--ppl-window`
  tokens (at most `--ppl-max-tokens` per file), with the tokens and windows scored.

Writes OUT/report.json, TensorBoard scalars under OUT/tensorboard and OUT/summary.png.
Bad input stops the run before the model is loaded, with `file:line: what is wrong`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from grc_jax import rundir
from grc_jax.errors import report_user_errors
from grc_jax.eval import data as eval_data
from grc_jax.eval import report as eval_report
from grc_jax.eval import tasks
from grc_jax.eval.data import InputError

TASKS = ("retrieval", "memory_qa", "generation", "latency", "perplexity")


class UsageError(ValueError):
    """Flags that do not make a run (a task without its inputs, an unknown task)."""


def _comma_list(values: Sequence[str] | None) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" says nothing; a help text that explains its own default needs no second one
        if action.default in (None, "") or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grc_jax.evaluate", description=__doc__.splitlines()[0], formatter_class=_Help
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="DIR", help="a training run directory (grc_jax.train's workdir)")
    model.add_argument("--hf", metavar="DIR", help="an HF export (grc_jax.hf.save_pretrained)")
    p.add_argument("--step", type=int, help="with --checkpoint: the step to load (default: the latest)")
    p.add_argument("--task", default="all", help=f"comma list of {', '.join(TASKS)}, or all")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.json, tensorboard/ and summary.png go")
    p.add_argument("--beir", action="append", metavar="DIR", help="a BEIR-format dataset directory (repeatable)")
    p.add_argument("--split", default="test", help="qrels/<split>.tsv")
    p.add_argument("--qa", metavar="FILE", help="memory QA JSONL: question, answer, positive, negatives")
    p.add_argument("--generation", action="append", metavar="FILE", help="question/answer JSONL (repeatable)")
    p.add_argument(
        "--text",
        action="append",
        metavar="FILE",
        help="perplexity text: a UTF-8 text file, or JSONL with a 'text' field (repeatable)",
    )
    p.add_argument("--limit", type=int, help="at most this many queries / records per input")
    p.add_argument("--query-modes", default="plain,reason", help="retrieval query embeddings: plain, reason")
    p.add_argument(
        "--ignore-identical-ids",
        action="store_true",
        help="never rank the document whose id is the query's (BEIR's option; ArguAna, Quora)",
    )
    p.add_argument("--query-prompt", default="", help="instruction put before every query")
    p.add_argument("--document-prompt", default="", help="instruction put before every document")
    p.add_argument("--num-distractors", type=int, default=4, help="memory QA: distractor documents per question")
    p.add_argument("--qa-max-new-tokens", type=int, default=32, help="memory QA: answer length bound")
    p.add_argument("--gen-max-new-tokens", type=int, default=256, help="generation: output length bound")
    p.add_argument("--gen-template", default="{question}", help="generation prompt; {question} is replaced")
    p.add_argument("--latency-samples", type=int, default=4, help="requests timed per mode")
    p.add_argument("--latency-tokens", type=int, default=32, help="tokens generated per timed request")
    p.add_argument("--ppl-window", type=int, default=512, help="perplexity: tokens per scored window")
    p.add_argument("--ppl-max-tokens", type=int, help="perplexity: at most this many tokens per text file")
    p.add_argument("--eos-token", help="the token that ends an answer (default: the model's, from its files)")
    p.add_argument(
        "--eor-token",
        help="end-of-reasoning token (default: the model's, from its files); 'none' turns self-reasoning off",
    )
    p.add_argument("--batch-size", type=int, default=32, help="texts or prompts per model call")
    p.add_argument("--max-reason-tokens", type=int, default=64, help="self-reasoning trace length bound")
    p.add_argument("--num-pages", type=int, help="KV pool pages (default: about 256 MiB of pages)")
    p.add_argument("--page-size", type=int, default=16, help="KV pool slots per page")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--seed", type=int, default=0, help="distractor choice and order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclasses.dataclass
class Inputs:
    beir: list[eval_data.BeirDataset]
    qa: list[eval_data.QARecord] | None
    generation: dict[str, list[eval_data.QARecord]]
    texts: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _chosen_tasks(args: argparse.Namespace) -> tuple[list[str], bool]:
    names = _comma_list([args.task])
    unknown = [t for t in names if t not in (*TASKS, "all")]
    if unknown or not names:
        raise UsageError(f"--task: unknown task(s) {unknown or names}; choose from {', '.join(TASKS)}, all")
    if "all" in names:
        return list(TASKS), True
    return [t for t in TASKS if t in names], False


def load_inputs(args: argparse.Namespace, chosen: list[str], implicit: bool) -> tuple[list[str], Inputs]:
    """Reads and checks every input before the model is opened. With `all`, a task without its
    inputs is skipped; named explicitly, it is an error."""
    need = {
        "retrieval": bool(args.beir),
        "memory_qa": bool(args.qa),
        "generation": bool(args.generation),
        "latency": bool(args.qa or args.generation),
        "perplexity": bool(args.text),
    }
    flag = {
        "retrieval": "--beir=DIR",
        "memory_qa": "--qa=FILE",
        "generation": "--generation=FILE",
        "latency": "--qa=FILE or --generation=FILE",
        "perplexity": "--text=FILE",
    }
    for task in chosen:
        if not need[task] and not implicit:
            raise UsageError(f"task {task} needs {flag[task]}")
    chosen = [t for t in chosen if need[t]]
    if not chosen:
        raise UsageError("nothing to evaluate: give --beir, --qa, --generation or --text inputs")
    beir = []
    if "retrieval" in chosen:
        for directory in _comma_list(args.beir):
            dataset = eval_data.load_beir(directory, args.split)
            if args.limit is not None:
                keep = dataset.query_ids[: args.limit]
                dataset = dataclasses.replace(
                    dataset,
                    query_ids=keep,
                    query_texts=dataset.query_texts[: args.limit],
                    qrels={q: dataset.qrels[q] for q in keep},
                    excluded={q: v for q, v in dataset.excluded.items() if q in keep},
                )
            # two directories of the same name (a/scifact, b/scifact) must not share metrics
            beir.append(dataclasses.replace(dataset, name=_unique_name(dataset.name, {d.name: d for d in beir})))
    qa = None
    if args.qa and ("memory_qa" in chosen or "latency" in chosen):
        qa = eval_data.load_qa(args.qa, need_documents=True, limit=args.limit)
    generation = {}
    if "generation" in chosen or ("latency" in chosen and qa is None):
        for file in _comma_list(args.generation):
            generation[_unique_name(Path(file).stem, generation)] = eval_data.load_qa(
                file, need_documents=False, limit=args.limit
            )
    texts = {}
    if "perplexity" in chosen:
        for file in _comma_list(args.text):
            texts[_unique_name(Path(file).stem, texts)] = eval_data.load_texts(file)
    return chosen, Inputs(beir, qa, generation, texts)


def _unique_name(name: str, taken: dict[str, Any]) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}_{n}", n + 1
    return out


def _checkpoint_step(args: argparse.Namespace) -> int:
    """The TensorBoard step: the checkpoint's training step, 0 for an HF export."""
    if args.step is not None:
        return args.step
    if args.checkpoint:
        return max(rundir.saved_steps(args.checkpoint), default=0)
    return 0


def _check_token_flags(source: str, is_run: bool, flags: dict[str, str | None]) -> None:
    """A token flag that the model's tokenizer lacks is named now, before the model loads."""
    directory = Path(source) / "tokenizer" if is_run else Path(source)
    if not (directory / "tokenizer.json").is_file():
        return  # a .gguf file keeps its tokenizer in its metadata: Engine names a missing token
    from grc_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(directory)
    for flag, token in flags.items():
        if token is not None and tokenizer.token_to_id(token) is None:
            raise UsageError(f"{flag}={token!r} is not a token of the tokenizer at {directory}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    chosen, implicit = _chosen_tasks(args)
    query_modes = tuple(_comma_list([args.query_modes]))
    if not query_modes or set(query_modes) - set(tasks.QUERY_MODES):
        raise UsageError(f"--query-modes: choose from {', '.join(tasks.QUERY_MODES)}")
    eor_token = None if (args.eor_token or "").lower() == "none" else args.eor_token
    if args.eor_token is not None and eor_token is None:
        query_modes = tuple(m for m in query_modes if m != "reason")
        if not query_modes:
            raise UsageError("--query-modes=reason needs an end-of-reasoning token, but --eor-token=none")
    for flag, value, least in (
        ("--limit", args.limit, 1),
        ("--latency-samples", args.latency_samples, 1),
        ("--latency-tokens", args.latency_tokens, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-distractors", args.num_distractors, 0),
        ("--qa-max-new-tokens", args.qa_max_new_tokens, 1),
        ("--gen-max-new-tokens", args.gen_max_new_tokens, 1),
        ("--max-reason-tokens", args.max_reason_tokens, 1),
        ("--num-pages", args.num_pages, 1),
        ("--page-size", args.page_size, 1),
        ("--prefill-chunk", args.prefill_chunk, 1),
        ("--ppl-window", args.ppl_window, 2),
        ("--ppl-max-tokens", args.ppl_max_tokens, 2),
        ("--step", args.step, 0),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.step is not None:
        if args.hf:
            raise UsageError("--step picks a checkpoint of a training run: it goes with --checkpoint, not --hf")
        rundir.check_step(args.checkpoint, args.step)
    if args.gen_template.count("{question}") != 1:
        raise UsageError("--gen-template must contain {question} exactly once")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():  # found now, not after the model has loaded and run
        raise UsageError(f"--out={args.out}: a file, not a directory; name a directory for report.json")
    _check_token_flags(
        args.checkpoint or args.hf,
        bool(args.checkpoint),
        {"--eos-token": args.eos_token, "--eor-token": eor_token if args.eor_token is not None else None},
    )
    chosen, inputs = load_inputs(args, chosen, implicit)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out={args.out}: cannot create the directory: {e.strerror}") from None

    from grc_jax.inference.engine import Engine  # JAX starts only once the inputs are known good
    from grc_jax.special_tokens import FROM_MODEL

    started = time.time()
    source = args.checkpoint or args.hf
    # a token flag not given is the model's own (from its files); FROM_MODEL leaves it to Engine
    engine_kwargs = dict(
        eos_token=FROM_MODEL if args.eos_token is None else args.eos_token,
        eor_token=FROM_MODEL if args.eor_token is None else eor_token,
        page_size=args.page_size,
        prefill_chunk=args.prefill_chunk,
        max_reason_tokens=args.max_reason_tokens,
        batch_size=args.batch_size,
        num_pages=args.num_pages,
        prompts={"query": args.query_prompt, "document": args.document_prompt},
    )
    if args.checkpoint:
        engine = Engine.from_pretrained(source, step=args.step, **engine_kwargs)
    else:
        engine = Engine.from_pretrained(source, **engine_kwargs)
    options = tasks.Options(
        batch_size=args.batch_size,
        progress=not args.no_progress,
        query_modes=query_modes,
        ignore_identical_ids=args.ignore_identical_ids,
        num_distractors=args.num_distractors,
        qa_max_new_tokens=args.qa_max_new_tokens,
        gen_max_new_tokens=args.gen_max_new_tokens,
        gen_template=args.gen_template,
        latency_samples=args.latency_samples,
        latency_tokens=args.latency_tokens,
        seed=args.seed,
        ppl_window=args.ppl_window,
        ppl_max_tokens=args.ppl_max_tokens,
    )

    per_file = {"generation": (tasks.generation, inputs.generation), "perplexity": (tasks.perplexity, inputs.texts)}
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    for task in chosen:
        task_started = time.time()
        if task == "retrieval":
            for dataset in inputs.beir:
                m, d = tasks.retrieval(engine, dataset, options)
                metrics.update(m)
                details.setdefault("retrieval", {})[dataset.name] = d
        elif task == "memory_qa":
            m, details["memory_qa"] = tasks.memory_qa(engine, inputs.qa, options)
            metrics.update(m)
        elif task in per_file:  # one run per input file, reported under the file's name
            task_fn, named_inputs = per_file[task]
            for name, items in named_inputs.items():
                m, details.setdefault(task, {})[name] = task_fn(engine, name, items, options)
                metrics.update(m)
        elif task == "latency":
            records = inputs.qa if inputs.qa is not None else next(iter(inputs.generation.values()))
            m, details["latency"] = tasks.latency(engine, records, options)
            metrics.update(m)
        details.setdefault("seconds", {})[task] = round(time.time() - task_started, 3)
        _print_task(task, metrics)

    step = _checkpoint_step(args)
    c = engine.config
    report = {
        "model": str(source),
        "model_kind": "checkpoint" if args.checkpoint else "hf",
        "step": step,
        "tasks": chosen,
        "metrics": metrics,
        "details": details,
        "model_config": {
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "num_latents": c.num_latents,
            "max_segment_len": c.max_segment_len,
            "dtype": c.dtype,
        },
        "settings": {k: v for k, v in vars(args).items()},
        "special_tokens": engine.special_tokens.to_json(),  # what the model's files (or the flags) gave
        "elapsed_s": round(time.time() - started, 3),
    }
    eval_report.write_json(out_dir, report)
    eval_report.write_tensorboard(out_dir, metrics, step)
    eval_report.write_chart(out_dir, metrics, f"{Path(source).name} (step {step})")
    return report


def _print_task(task: str, metrics: dict[str, float]) -> None:
    prefix = "memory_qa/" if task == "memory_qa" else f"{task}/"
    for name, value in metrics.items():
        if name.startswith(prefix):
            print(f"{name}: {value:.4g}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # the message already names the file and line; a traceback would bury it
    report = report_user_errors(run, extra=(InputError, UsageError))(args)
    print(f"report: {Path(args.out) / eval_report.REPORT_FILE}", flush=True)
    return report


if __name__ == "__main__":
    main()
