"""Inspect prompts layer by layer in the browser: projections on the seven concept vectors and the
refusal direction, a logit lens, and the greedy answer with its refusal label; base vs adapter.

  emalab inspect                                         # default model, http://127.0.0.1:8765/
  emalab inspect --adapter results/stages/unlearn/<hash>/adapter
  emalab inspect --results results --port 9000

Concept vectors and the refusal direction are read from --results when saved there; otherwise the
concept vectors (and a fallback refusal direction) are computed once from the probe split and
cached. The server binds to loopback only and logs method, path, status and latency, never
prompts or answers. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

NAME = "inspect"
HELP = "serve an interactive layer-by-layer inspector of prompts (base vs adapter) on 127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from interp.registry import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, hub id or directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="an unlearning run's adapter directory, or any PEFT adapter directory or hub id "
                             "(checked against its base model): the page then shows base vs adapted")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="results root or run directory holding concepts.safetensors / direction.safetensors "
                             "(default: results)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default: 8765)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default: exact for adapters, docs/numerics.md) or bfloat16")
    from emalab.commands._model_args import DEVICE_HELP, add_model_source_arguments

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_model_source_arguments(parser, raw_prompts=True)
    parser.add_argument("--probe-limit", type=int, default=12,
                        help="probe prompts per domain when the concept vectors are computed here (default: 12)")
    parser.add_argument("--answer-tokens", type=int, default=48, help="greedy answer length in tokens (default: 48)")
    parser.add_argument("--k", type=int, default=5, help="logit-lens tokens per layer (default: 5)")
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="longest prompt accepted (default: 256)")
    parser.add_argument("--token", default=None,
                        help="require this token (>= 16 characters) on every API request, for shared machines; "
                             "open the page as /?token=TOKEN (default: $EMALAB_INSPECTOR_TOKEN, else none)")
    parser.add_argument("--workers", type=int, default=8, help="requests served at once; more get a 503 (default: 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is often faster on a busy shared CPU")


def run(args: argparse.Namespace) -> int:
    from emalab.inspector import (
        InspectorConfig,
        InspectorService,
        check_loopback,
        make_server,
        resolve_vectors,
    )
    from interp.loading import load_model
    from interp.registry import cache_root

    check_loopback(args.host)  # before minutes of loading, not after
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.probe_limit < 2:
        raise ValueError("--probe-limit must be at least 2 prompts per domain")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    token = args.token or os.environ.get("EMALAB_INSPECTOR_TOKEN") or None
    if token is not None and len(token) < 16:
        raise ValueError("--token must be at least 16 characters; e.g. python -c "
                         "'import secrets; print(secrets.token_urlsafe())'")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    cfg = InspectorConfig(k=args.k, answer_tokens=args.answer_tokens, max_prompt_tokens=args.max_prompt_tokens,
                          raw=args.raw_prompts)
    from emalab.commands._model_args import model_kwargs

    lm = load_model(args.model, dtype=args.dtype, **model_kwargs(args))
    if args.adapter is not None:
        from training.lora import load_adapter

        load_adapter(lm, args.adapter)  # AdapterMismatchError names both models
    vectors = resolve_vectors(lm, args.results, cache_root() / "inspector", args.probe_limit, raw=args.raw_prompts)
    print(f"concept vectors: {vectors.concepts_source}", file=sys.stderr)
    print(f"refusal direction: {vectors.refusal_source}", file=sys.stderr)
    service = InspectorService(lm, vectors, cfg, adapter=str(args.adapter) if args.adapter else None)
    try:
        server = make_server(service, args.host, args.port, token=token, workers=args.workers)
    except OSError as err:
        raise ConnectionError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
                              "pick another --port (0 for any free one)") from err
    url = f"{server.url}?token=<your token>" if token else server.url
    print(f"emalab inspector on {url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
