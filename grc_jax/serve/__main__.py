"""python -m grc_jax.serve --model=PATH [--bank=DIR] [--host=127.0.0.1] [--port=8000] [--api-key=KEY]

PATH is anything `Engine.from_pretrained` opens (a training run directory or an HF export).
With --bank, memories live in that bank directory: loaded at start, and every change is on disk
before its response. SIGTERM (or Ctrl-C) lets in-flight requests finish, then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m grc_jax.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a training run directory or an HF export")
    p.add_argument("--bank", help="memory bank directory (made when absent); without it memories live in memory only")
    p.add_argument(
        "--bank-cache-mb",
        type=int,
        default=256,
        help="memories' keys and values kept in memory after their first read from the bank (MiB)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("GRC_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $GRC_API_KEY)",
    )
    p.add_argument("--model-name", help="the id /v1/models reports (default: the model path's name)")
    p.add_argument("--slots", type=int, default=16, help="rows of the continuous decode batch")
    p.add_argument("--max-len", type=int, default=1024, help="most tokens of one row: prompt plus max_tokens")
    p.add_argument("--max-memories", type=int, default=16, help="most memories one request reads")
    p.add_argument(
        "--steps-per-chunk",
        type=int,
        default=8,
        help="decode steps between two points where requests join, leave and stream",
    )
    p.add_argument("--num-pages", type=int, help="KV pages in the pool (default: the Engine's 256 MiB worth)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--eos-token", default="</s>")
    p.add_argument(
        "--eor-token",
        default="<|end_of_reasoning|>",
        help="end-of-reasoning token of self-reasoned embeddings; a model whose tokenizer lacks it serves without them",
    )
    p.add_argument("--default-max-tokens", type=int, default=256, help="a chat request's max_tokens when it sets none")
    p.add_argument(
        "--memory-prior",
        action="store_true",
        help="requests read their memories under memory priors (docs/design.md section 8) unless they "
        "send memory_prior=false",
    )
    p.add_argument(
        "--prior-temperature",
        type=float,
        default=0.05,
        help="the priors' temperature: the model's train.prior_temperature",
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="skip compiling the decode, prefill and embedding programs at start (/health says ok at "
        "once; the first requests compile them)",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.prior_temperature <= 0:
        p.error(f"--prior-temperature must be > 0, got {args.prior_temperature}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from grc_jax.inference import Engine, MemoryBank
    from grc_jax.serve.app import create_app
    from grc_jax.serve.worker import Worker

    try:
        eor = args.eor_token if _tokenizer_has(args.model, args.eor_token) else None
        if eor is None:
            logging.getLogger("grc_jax.serve").warning(
                "the tokenizer has no %r: self-reasoned embeddings (reason=true) are off", args.eor_token
            )
        engine = Engine.from_pretrained(
            args.model,
            num_pages=args.num_pages,
            page_size=args.page_size,
            prefill_chunk=args.prefill_chunk,
            eos_token=args.eos_token,
            eor_token=eor,
        )
        if args.bank:
            engine.bank = MemoryBank.open(args.bank, engine.bank_spec, kv_cache_bytes=max(0, args.bank_cache_mb) << 20)
        worker = Worker(
            engine,
            slots=args.slots,
            max_len=args.max_len,
            max_memories=args.max_memories,
            steps_per_chunk=args.steps_per_chunk,
            warm_up=args.warm_up,
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"grc_jax.serve: {e}", file=sys.stderr)
        return 2
    app = create_app(
        worker,
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key,
        default_max_tokens=args.default_max_tokens,
        memory_prior=args.memory_prior,
        prior_temperature=args.prior_temperature,
    )
    # On SIGTERM or SIGINT uvicorn stops accepting, waits for in-flight requests, then runs the
    # app's shutdown (which drains and stops the engine thread).
    server = _server_class()(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    )
    server.run()
    return 0


def _tokenizer_has(model: str, token: str) -> bool:
    """Whether the tokenizer of `model` (an HF directory or a training run) has `token`; True
    when it cannot be read here, so that Engine.from_pretrained reports the problem."""
    from grc_jax.tokenizer import Tokenizer

    path = Path(model)
    path = path / "tokenizer" if (path / "model_config.json").is_file() else path
    try:
        return Tokenizer.from_dir(path).token_to_id(token) is not None
    except Exception:  # noqa: BLE001 - any unreadable tokenizer is from_pretrained's to name
        return True


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM after a clean shutdown ends the process with
        status 0 (uvicorn re-raises the signal, so the exit status would say "killed")."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


if __name__ == "__main__":
    sys.exit(main())
