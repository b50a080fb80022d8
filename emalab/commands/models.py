"""List the embedded model registry with cache state, or fetch a model into the cache."""

from __future__ import annotations

NAME = "models"
HELP = "list embedded models and their cache state; --fetch NAME downloads and converts one"


def add_arguments(parser) -> None:
    parser.add_argument("--fetch", metavar="NAME", help="download, verify and cache this embedded model")
    parser.add_argument("--force", action="store_true", help="with --fetch: rebuild the cache entry")


def run(args) -> int:
    from interp.registry import DEFAULT_MODEL, EMBEDDED_MODELS, cache_root, fetch_embedded, is_cached

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
