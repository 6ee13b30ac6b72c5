"""What a training run shows: the val table, val curves as a PNG, and a held-out passage reconstructed.

    python -m arctrain.inference.report --run runs/smollm2_cpu --png runs/smollm2_cpu/val_curves.png \
        --export runs/smollm2_cpu/export --decoder smollm2=artifacts/smollm2-135m \
        --decoder gemma=artifacts/gemma3-270m --input artifacts/corpus.jsonl --val-fraction 0.05

The table and the curves come from RUN/metrics.jsonl (the trainer's `val/<decoder>/<task>/loss` and
`..._loss_no_context`). With --export and --decoder (one or more), the held-out documents of --input (the shards'
own val split: `data_tools.build.is_val` on the same document ids) give each decoder's reconstruction token
accuracy (teacher forcing) and one passage reconstructed greedily from its vectors, printed under the original:
the same passage for every decoder (chosen from the encoder's segments), so the decoders compare line by line.
"""

import argparse
import json
from pathlib import Path

from arctrain.inference.eval import reconstruction
from arctrain.inference.generate import ARCGenerator
from arctrain.model import Example
from data_tools.build import is_val
from data_tools.inputs import Fields, Tally, expand_inputs, read_documents


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_curves(lines: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """'<decoder>/<task>' -> {"with": [(step, loss)], "without": [(step, loss)]} from the val rows."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in lines:
        for key, value in row.items():
            if key.startswith("val/") and key.endswith("/loss"):
                curve = curves.setdefault(key[4:-5], {"with": [], "without": []})
                curve["with"].append((row["step"], value))
                if key + "_no_context" in row:
                    curve["without"].append((row["step"], row[key + "_no_context"]))
    return dict(sorted(curves.items()))


def val_table(lines: list[dict]) -> str:
    """The last val losses with vs without compressed context, per decoder and task, and their ratio."""
    curves = val_curves(lines)
    if not curves:
        return "no val rows in metrics.jsonl (eval.interval = 0?)"
    step = max(c["with"][-1][0] for c in curves.values())
    out = [f"val loss at step {step}: with compressed context vs no context", f"  {'':28} {'with':>7} {'without':>8}"]
    for name, curve in curves.items():
        with_ctx = curve["with"][-1][1]
        if curve["without"]:
            without = curve["without"][-1][1]
            out.append(f"  {name:<28} {with_ctx:7.3f} {without:8.3f}   {with_ctx / without:.2f}x")
        else:
            out.append(f"  {name:<28} {with_ctx:7.3f}")
    return "\n".join(out)


def plot_val_curves(lines: list[dict], png: Path) -> Path:
    """One panel per decoder and task: val loss with and without compressed context against steps."""
    # matplotlib is slow to import; only the PNG needs it
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    # matplotlib is slow to import; only the PNG needs it
    import matplotlib.pyplot as plt

    curves = val_curves(lines)
    if not curves:
        raise ValueError("metrics.jsonl has no val rows to plot (eval.interval = 0?)")
    decoders = sorted({name.split("/")[0] for name in curves})
    tasks = sorted({name.split("/", 1)[1] for name in curves})
    fig, axes = plt.subplots(len(decoders), len(tasks), figsize=(4.2 * len(tasks), 3 * len(decoders)), squeeze=False)
    for name, curve in curves.items():
        decoder, task = name.split("/", 1)
        ax = axes[decoders.index(decoder)][tasks.index(task)]
        for label, points in (("compressed context", curve["with"]), ("no context", curve["without"])):
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def heldout_texts(inputs: list[str], val_fraction: float, limit: int) -> list[str]:
    """The documents `arc-data build --val-fraction` put in the val split, read the way it reads them."""
    return split_texts(inputs, val_fraction, limit, "val")


def split_texts(inputs: list[str], val_fraction: float, limit: int, split: str = "val") -> list[str]:
    """The first `limit` documents `arc-data build --val-fraction` put in `split` ("val" or "train")."""

    texts = []
    for doc in read_documents(expand_inputs(inputs), Fields(), Tally()):
        if is_val(doc.digest, val_fraction) == (split == "val"):
            texts.append(doc.text)
            if len(texts) == limit:
                break
    if not texts:
        raise ValueError(f"--input {' '.join(inputs)}: no document falls in the {split} split of {val_fraction}")
    return texts


def reconstruction_report(export: Path, decoder: str, texts: list[str], max_segments: int = 64) -> str:
    """Token accuracy of reconstructing held-out segments, and the first long segment reconstructed greedily."""

    name, _, path = decoder.partition("=")
    arc = ARCGenerator(export, path, name or None)
    scores = reconstruction(arc, texts, batch_size=16, max_segments=max_segments)
    # A full-length segment with the most words (not one of the docstrings' runs of indentation and blank lines).
    segment = max((s for t in texts[:8] for s in arc.segments(t)[:4]), key=lambda s: (len(s), len(words(arc, s))))
    original = arc.enc_tok.decode(segment)
    prefix = [arc.text(arc.prefix)] if arc.prefix else []
    n_target = len(arc.dec_tok.encode(original, add_special_tokens=False))
    example = Example(prefix + [arc.pieces.memory([original], "rec")])
    rebuilt = arc.generate([example], max_new_tokens=n_target + 4).texts[0]
    vectors = int(arc.batch([example]).n_vectors.sum())
    return "\n".join(
        [
            f"{arc.name} reconstruction of {scores['segments']} held-out segments: token accuracy "
            f"{scores['token_accuracy']:.3f}, loss {scores['loss']:.3f} ({scores['tokens']} tokens)",
            f"held-out passage ({len(segment)} encoder tokens -> {vectors} vectors), original:",
            f"  {original!r}",
            f"reconstructed greedily by {arc.name} from its vectors:",
            f"  {rebuilt!r}",
        ]
    )


def words(arc, segment: list[int]) -> list[str]:
    return arc.enc_tok.decode(segment).split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m arctrain.inference.report", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the run directory")
    parser.add_argument("--png", type=Path, help="write the val curves here (default: RUN/val_curves.png)")
    parser.add_argument("--export", type=Path, help="the run's export (arctrain export), for the reconstruction")
    parser.add_argument("--decoder", action="append", default=[], help="NAME=DIR of a decoder that reconstructs")
    parser.add_argument("--input", action="append", default=[], help="the text the shards were built from")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="the shards' --val-fraction")
    args = parser.parse_args(argv)
    lines = read_metrics(args.run)
    if not val_curves(lines):
        raise ValueError(f"{args.run / 'metrics.jsonl'}: no val rows to report (was eval.interval 0?)")
    print(val_table(lines))
    if args.export and args.decoder and args.input:
        texts = heldout_texts(args.input, args.val_fraction, 64)
        for decoder in args.decoder:
            print(reconstruction_report(args.export, decoder, texts))
    print(f"val curves: {plot_val_curves(lines, args.png or args.run / 'val_curves.png')}")


if __name__ == "__main__":
    import sys

    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        print(f"arctrain report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
