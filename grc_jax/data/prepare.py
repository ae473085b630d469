"""Public datasets -> GRC training records: `python -m grc_jax.data.prepare FORMAT --input=PATH --out=DIR`.

FORMAT is one of beir, msmarco, squad, hotpotqa, nq, text, records (see grc_jax/data/formats/).
Documents longer than --max-segment-len tokens of --tokenizer (the model's; without it, words)
are chunked; records with fewer than --negatives negatives get mined ones with --mine=bm25 or
--mine=model:RUN. The records go to DIR/records.jsonl or DIR/records-*.arrayrecord, which
`python -m grc_jax.train --config.data.train_files=...` reads, and DIR/report.json says what was
written and skipped.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from grc_jax.data import arrayrecord, mining, records
from grc_jax.data.chunking import Chunker
from grc_jax.data.formats import CONVERTERS, Context, FormatError, Output, Skip
from grc_jax.files import atomic_write_bytes, atomic_write_json
from grc_jax.tokenizer import Tokenizer

EXAMPLES_PER_REASON = 3
_HISTOGRAM_EDGES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def prepare(
    fmt: str,
    input_path: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    max_segment_len: int = 128,
    negatives: int = 4,
    mine: str | None = None,
    format_out: str = "jsonl",
    split: str | None = None,
    text_field: str = "text",
    records_per_shard: int = 50_000,
) -> dict[str, Any]:
    """Converts, mines, writes the records and report.json; returns the report."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(CONVERTERS)}")
    if format_out not in ("jsonl", "arrayrecord"):
        raise ValueError(f"--format-out must be jsonl or arrayrecord, got {format_out!r}")
    if negatives < 0:
        raise ValueError(f"--negatives must be >= 0, got {negatives}")
    for flag, value in (("--max-segment-len", max_segment_len), ("--records-per-shard", records_per_shard)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    ranker = _ranker(mine)
    chunker = Chunker(Tokenizer.from_dir(tokenizer) if tokenizer else None, max_segment_len)
    ctx = Context(chunker=chunker, negatives=negatives, split=split, text_field=text_field)
    outputs: list[Output] = []
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    for item in CONVERTERS[fmt](Path(input_path), ctx):
        if isinstance(item, Skip):
            skipped[item.reason].append(item.source)
            continue
        if "negatives" in item.record and not item.record["negatives"]:
            del item.record["negatives"]
        try:  # every record must be one training accepts
            records.parse_record(json.dumps(item.record), item.source)
        except ValueError as e:
            skipped[f"not a valid GRC record: {str(e).split(': ', 1)[-1]}"].append(item.source)
            continue
        outputs.append(item)
    mined = 0
    if ranker is not None and negatives:
        corpus = (
            ctx.corpus
            if ctx.corpus is not None
            else [t for o in outputs for t in (o.record.get("positive"), *o.record.get("negatives", ())) if t]
        )
        mined = mining.mine(outputs, corpus, negatives, ranker)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({k: o.record[k] for k in records.FIELDS if k in o.record}, ensure_ascii=False).encode("utf-8")
        for o in outputs
    ]
    files = _write(lines, out_dir, format_out, records_per_shard)
    report = _report(fmt, input_path, files, outputs, skipped, ctx, mined, mine)
    atomic_write_json(out_dir / "report.json", report, indent=2)
    return report


def _ranker(mine: str | None) -> mining.Ranker | None:
    if mine is None:
        return None
    if mine == "bm25":
        return mining.bm25_ranker
    if mine.startswith("model:") and mine[len("model:") :]:
        return mining.model_ranker(mine[len("model:") :])
    raise ValueError(f"--mine must be bm25 or model:RUN_DIR, got {mine!r}")


def _write(lines: list[bytes], out_dir: Path, format_out: str, records_per_shard: int) -> list[str]:
    # A previous run's output in the other format, or with more shards, would be read with this one.
    for old in [*out_dir.glob("records-*-of-*.arrayrecord"), out_dir / "records.jsonl"]:
        old.unlink(missing_ok=True)
    if format_out == "arrayrecord":
        return [str(p) for p in arrayrecord.write_shards(lines, out_dir, records_per_shard)]
    path = out_dir / "records.jsonl"
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines))
    return [str(path)]


def _report(
    fmt: str,
    input_path: str | Path,
    files: list[str],
    outputs: list[Output],
    skipped: dict[str, list[str]],
    ctx: Context,
    mined: int,
    mine: str | None,
) -> dict[str, Any]:
    fields = ("query", "reasoning", "positive", "negatives", "question", "answer", "text")
    lengths: dict[str, list[int]] = {}
    for name in fields:
        texts = [
            t
            for o in outputs
            for t in (o.record.get(name, ()) if name == "negatives" else [o.record[name]] if name in o.record else [])
        ]
        if texts:
            lengths[name] = ctx.chunker.counts(texts)
    negatives = collections.Counter(len(o.record.get("negatives", ())) for o in outputs if "positive" in o.record)
    return {
        "format": fmt,
        "input": str(input_path),
        "files": files,
        "records_written": len(outputs),
        "skipped": {
            reason: {"count": len(sources), "examples": sources[:EXAMPLES_PER_REASON]}
            for reason, sources in sorted(skipped.items())
        },
        "notes": dict(sorted(ctx.notes.items())),
        "length_unit": ctx.chunker.unit,
        "max_segment_len": ctx.chunker.max_len,
        "lengths": {name: _histogram(values) for name, values in lengths.items()},
        "negatives_per_record": {str(k): negatives[k] for k in sorted(negatives)},
        "mined_negatives": mined,
        "mine": mine,
    }


def _histogram(values: list[int]) -> dict[str, Any]:
    bins: dict[str, int] = {}
    for v in values:
        edge = next((e for e in _HISTOGRAM_EDGES if v <= e), None)
        label = f"<={edge}" if edge is not None else f">{_HISTOGRAM_EDGES[-1]}"
        bins[label] = bins.get(label, 0) + 1
    order = [f"<={e}" for e in _HISTOGRAM_EDGES] + [f">{_HISTOGRAM_EDGES[-1]}"]
    return {
        "count": len(values),
        "mean": round(sum(values) / len(values), 1),
        "max": max(values),
        "histogram": {k: bins[k] for k in order if k in bins},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    out = [f"{report['records_written']} records written to {', '.join(report['files'])}"]
    for reason, s in report["skipped"].items():
        out.append(f"skipped {s['count']}: {reason} (e.g. {'; '.join(s['examples'])})")
    for note, count in report["notes"].items():
        out.append(f"note {count}: {note}")
    for name, h in report["lengths"].items():
        bins = " ".join(f"{k}:{v}" for k, v in h["histogram"].items())
        out.append(f"{name} length ({report['length_unit']}): mean {h['mean']}, max {h['max']} | {bins}")
    if report["negatives_per_record"]:
        out.append(
            "negatives per record: "
            + " ".join(f"{k}:{v}" for k, v in report["negatives_per_record"].items())
            + (f" ({report['mined_negatives']} mined with {report['mine']})" if report["mine"] else "")
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grc_jax.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=sorted(CONVERTERS))
    parser.add_argument("--input", required=True, help="the dataset file or directory")
    parser.add_argument("--out", required=True, help="directory for the records and report.json")
    parser.add_argument("--tokenizer", help="a directory with the model's tokenizer.json (default: count words)")
    parser.add_argument("--max-segment-len", type=int, default=128, help="P: documents are chunked to this many tokens")
    parser.add_argument("--negatives", type=int, default=4, help="at most this many negatives per record")
    parser.add_argument("--mine", help="bm25, or model:RUN (a grc_jax run or HF export directory)")
    parser.add_argument("--format-out", default="jsonl", choices=("jsonl", "arrayrecord"))
    parser.add_argument("--split", help="BEIR: the qrels split (default: train, or the only one)")
    parser.add_argument("--text-field", default="text", help="text: the JSONL field holding the text")
    parser.add_argument("--records-per-shard", type=int, default=50_000, help="arrayrecord: records per shard")
    args = parser.parse_args(argv)
    try:
        report = prepare(
            args.format,
            args.input,
            args.out,
            tokenizer=args.tokenizer,
            max_segment_len=args.max_segment_len,
            negatives=args.negatives,
            mine=args.mine,
            format_out=args.format_out,
            split=args.split,
            text_field=args.text_field,
            records_per_shard=args.records_per_shard,
        )
    except (FormatError, ValueError, FileNotFoundError, OSError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
