"""The `arc-data` command: raw text -> tokenized WebDataset shards + manifest.json (docs/ARCHITECTURE.md §2).

    arc-data build --input 'raw/*.jsonl.zst' --out shards/ --encoder-tokenizer models/encoder \\
        --decoder llama=models/llama --decoder mistral=models/mistral --workers 8
    arc-data inspect shards/
    arc-data verify shards/
    arc-data merge --out shards/ parts/00000 parts/00001      # partial builds (slurm/build_shards.sh)

User errors (missing files, bad options, --strict on a bad record) print one line and exit with status 2;
`verify` exits with status 1 when a shard does not match the manifest.
"""

import argparse
import signal
import sys
from pathlib import Path

from data_tools.inputs import DataError


def _build(args: argparse.Namespace) -> int:
    # each command imports only its own modules: `arc-data --help` starts fast
    from data_tools.build import BuildConfig, build

    # each command imports only its own modules: `arc-data --help` starts fast
    from data_tools.tokenizer_set import parse_decoder

    cfg = BuildConfig(
        inputs=args.input,
        out=args.out,
        encoder_tokenizer=args.encoder_tokenizer,
        decoders=[parse_decoder(spec) for spec in args.decoder],
        text_field=args.text_field,
        id_field=args.id_field,
        id_scope=args.id_scope,
        segment_tokens=args.segment_tokens,
        window_segments=args.window_segments,
        val_fraction=args.val_fraction,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        strict=args.strict,
        overwrite=args.overwrite,
        start_shard=args.start_shard,
        resume=args.resume,
        progress=not args.no_progress,
    )
    build(cfg)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    # each command imports only its own modules: `arc-data --help` starts fast
    from data_tools.verify import inspect

    print(inspect(args.dir, max_samples=args.samples))
    return 0


def _verify(args: argparse.Namespace) -> int:
    # each command imports only its own modules: `arc-data --help` starts fast
    from data_tools.verify import verify

    problems = verify(args.dir)
    for problem in problems:
        print(f"arc-data verify: {args.dir}/{problem}", file=sys.stderr)
    if problems:
        print(f"arc-data verify: {len(problems)} problems in {args.dir}", file=sys.stderr)
        return 1
    print(f"arc-data verify: {args.dir}: every shard matches the manifest")
    return 0


def _merge(args: argparse.Namespace) -> int:
    # each command imports only its own modules: `arc-data --help` starts fast
    from data_tools.manifest import merge_builds

    merged = merge_builds(args.out, args.parts, args.overwrite)
    counts = ", ".join(
        f"{s['samples']} {name} samples in {len(s['shards'])} shards" for name, s in merged["splits"].items()
    )
    print(f"arc-data merge: {len(args.parts)} parts -> {args.out}: {counts}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arc-data", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="tokenize raw documents into shards")
    p.add_argument("--input", action="append", required=True, help="a .jsonl, .jsonl.zst or .parquet file or glob")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--encoder-tokenizer", required=True, help="Hugging Face tokenizer directory of the encoder")
    p.add_argument("--decoder", action="append", required=True, metavar="NAME=PATH", help="a decoder tokenizer")
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--id-field",
        default="id",
        help="the document id; records without it are named by the sha256 of their text (a field other than 'id' "
        "that none of a file's first 1000 records has is an error)",
    )
    p.add_argument(
        "--id-scope",
        default="file",
        choices=("file", "global"),
        help="file: ids name documents within their input file (default); global: one id space for all inputs",
    )
    p.add_argument("--segment-tokens", type=int, default=256, help="about this many encoder tokens per segment")
    p.add_argument("--window-segments", type=int, default=4, help="segments per sample")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="shard file size (MiB) to start a new shard at")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (one core each)")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable record instead of skipping")
    p.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished build in --out from its last complete shard (same options and inputs); "
        "the shards are byte-identical to an uninterrupted build's",
    )
    p.add_argument("--start-shard", type=int, default=0, help="first shard number (distinct per partial build)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is printed)")
    p.set_defaults(func=_build)

    p = sub.add_parser("inspect", help="counts, token statistics and a decoded sample")
    p.add_argument("dir", type=Path)
    p.add_argument("--samples", type=int, default=1000, help="samples read for the token statistics")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check every shard against the manifest; exit 1 on any mismatch")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_verify)

    p = sub.add_parser("merge", help="combine partial builds (distinct --start-shard) into one directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("parts", type=Path, nargs="+", help="directories of partial builds")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_merge)
    return parser


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: worker pools terminated, files closed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"arc-data {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        more = ""
        if args.command == "build":
            more = f"; rerun with --resume to continue from the last complete shard in {args.out}"
        print(f"arc-data {args.command}: interrupted{more}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
