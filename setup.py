from setuptools import find_packages, setup

setup(
    name="arctrain",
    version="0.1.0",
    description="Train ARC-style context compressors: one encoder, several frozen HF decoders, DeepSpeed ZeRO-3.",
    python_requires=">=3.10",
    packages=find_packages(include=["arctrain", "arctrain.*", "data_tools", "data_tools.*"]),
    package_data={"arctrain": ["export/hf/*.py"]},
    install_requires=[
        # The CPU wheel of 2.13.0 is what this project is tested with; an unpinned torch pulls a CUDA build.
        "torch==2.13.0",
        "deepspeed>=0.19.8,<0.20",  # 0.19.2 crashed with activation checkpointing + frozen params
        "transformers>=5.0,<6",
        "accelerate>=1.0",  # transformers needs it for HfDeepSpeedConfig: from_pretrained straight into ZeRO-3
        "gguf==0.19.0",  # transformers reads GGUF files with it (arctrain fetch-model)
        "matplotlib>=3.8,<4",  # the demo's val curves (arctrain/inference/report.py)
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "webdataset>=1.0,<2",
        "zstandard>=0.23",
        "msgpack>=1.0,<2",  # format-3 shards: one MessagePack member per sample (data_tools/sample_format.py)
        "pyarrow>=18",
        "wandb>=0.19",
        "tqdm>=4.66",
        "pyyaml>=6",
        "numpy>=1.26",
        # OptimizerParamScheduler (arctrain/train/optim.py): pure Python, imports on CPU without Apex or Transformer
        # Engine; its own pins (torch, numpy, packaging) agree with ours. Exact: its APIs move between releases.
        "megatron-core==0.16.1",
        # `arctrain eval` scores summaries and translations as the paper does (arctrain/inference/qa_metrics.py)
        "rouge-score==0.1.2",
        "sacrebleu>=2.4,<3",
        # Product-quantized vector stores (arctrain/inference/store_codec.py): codebooks written by faiss.write_index,
        # exact because a store is read back by the version that wrote it.
        "faiss-cpu==1.15.1",
        "regex>=2023",  # the reference's answer-in-output tokenizer (Unicode classes); transformers needs it too
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.8"],
        # flash-attn's varlen kernel for packed attention on CUDA (else torch's varlen_attn). It compiles against torch:
        # install the CUDA torch first, then `pip install -e .[gpu] --no-build-isolation`.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "arctrain=arctrain.cli:main",
            "arc-data=data_tools.cli:main",
        ]
    },
)
