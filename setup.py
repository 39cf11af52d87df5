"""Packaging for hai-llm.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``hai_llm.kernels`` so that ``import kernels`` can never clash with an
unrelated top-level package in a user's environment.
"""
from setuptools import setup

PACKAGES = [  # listed in import order: each imports only packages above it
    "hai_llm",
    "hai_llm.model",
    "hai_llm.config",
    "hai_llm.layout",
    "hai_llm.optim",
    "hai_llm.kernels",
    "hai_llm.fp8",
    "hai_llm.parallel",
    "hai_llm.pipeline",
    "hai_llm.runtime",
    "hai_llm.checkpoint",
    "hai_llm.data",
    "hai_llm.train",
    "hai_llm.planner",
    "hai_llm.interop",
    "hai_llm.infer",
    "hai_llm.launch",
]

setup(
    name="hai-llm",
    version="0.1.0",
    description="Distributed training of DeepSeek-V3-style MoE models: 4D mesh, DualPipe, FP8",
    packages=PACKAGES,
    package_dir={"hai_llm.kernels": "kernels", "hai_llm.launch": "launch"},
    python_requires=">=3.10",
    install_requires=[
        # torch is deliberately unpinned here: install the build that fits the machine first
        # (README), pip then finds the requirement satisfied and downloads nothing.
        "torch>=2.5",
        "triton>=3.0",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=5.23", "deepspeed>=0.19"],  # deepspeed: reference ZeRO-1 and launcher tests
    },
    entry_points={
        "console_scripts": [
            "hai-llm-train=hai_llm.launch.train:main",
            "hai-llm-prepare=hai_llm.launch.prepare:main",
            "hai-llm-params=hai_llm.launch.params:main",
            "hai-llm-dryrun=hai_llm.launch.dryrun:main",
            "hai-llm-cost=hai_llm.launch.cost:main",
            "hai-llm-sample=hai_llm.launch.sample:main",
        ]
    },
)
