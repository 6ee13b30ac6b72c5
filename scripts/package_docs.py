"""Real text that is not the embedded corpus, for `make demo INPUT=...`: the long descriptions (their READMEs) of
the Python distributions installed in this environment, written by many authors in Markdown or reStructuredText.
Each description is cut at paragraph boundaries into documents of about --chars characters.

    python scripts/package_docs.py --out artifacts/package_docs.jsonl
    make demo INPUT=artifacts/package_docs.jsonl RUN_DIR=runs/package_docs
"""

import argparse
import importlib.metadata
import json
from pathlib import Path


def descriptions(min_chars: int) -> list[tuple[str, str]]:
    """(distribution name, long description) for every installed distribution that has one, sorted by name."""
    out = {}
    for dist in importlib.metadata.distributions():
        body = (dist.metadata.get_payload() or dist.metadata.get("Description") or "").strip()
        if len(body) >= min_chars:
            out[dist.metadata["Name"].lower()] = body
    return sorted(out.items())


def paragraphs_in_documents(text: str, chars: int) -> list[str]:
    """Consecutive paragraphs joined until a document holds about `chars` characters."""
    docs, current = [], []
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        current.append(paragraph)
        if sum(len(p) + 2 for p in current) >= chars:
            docs.append("\n\n".join(current).strip())
            current = []
    if current and "\n\n".join(current).strip():
        docs.append("\n\n".join(current).strip())
    return [d for d in docs if d]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chars", type=int, default=4000, help="about this many characters per document")
    parser.add_argument("--min-chars", type=int, default=500, help="skip shorter descriptions")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_chars = 0
    dists = descriptions(args.min_chars)
    with open(args.out, "w") as fh:
        for name, body in dists:
            for k, text in enumerate(paragraphs_in_documents(body, args.chars)):
                fh.write(json.dumps({"id": f"{name}#{k}", "text": text}) + "\n")
                n_docs, n_chars = n_docs + 1, n_chars + len(text)
    print(f"{n_docs} documents ({n_chars / 1e6:.2f}M characters) from {len(dists)} distributions -> {args.out}")


if __name__ == "__main__":
    main()
