from setuptools import find_packages, setup

# Ranges here; the exact CPU versions are in tools/constraints-cpu.txt (the newest tested) and
# tools/constraints-oldest.txt (the oldest tested: NGC PyTorch 25.09's torch 2.9, run by
# tools/oldest_stack.sh): each lower bound is the oldest version a test runs on. megatron-core
# 0.19.2 is installed by tools/install.sh (with --ignore-requires-python on Python 3.11, which
# setup.py cannot express). A range for torch lets `pip install -e .` keep a GPU container's own
# torch.
setup(
    name="megatron_ntp",
    version="0.1.0",
    description="Pretraining with a generalized (shaped) next-token loss on megatron-core",
    packages=find_packages(include=["megatron_ntp", "megatron_ntp.*"]),
    package_data={"megatron_ntp.loss": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.9.0a0",  # a pre-release bound: NGC 25.09 ships torch 2.9.0a0+<commit>
        "numpy<3",
        "pyyaml",
        "sentencepiece",
        "tokenizers",
        "matplotlib",
        "scipy",
        "threadpoolctl",  # one BLAS thread for the tiny L-BFGS-B problems of scaling-law fits
        "tensorboard",
        "ninja",  # torch's extension builder (the CPU kernels, megatron_ntp/loss/csrc)
        # Hugging Face export (megatron_ntp/export): Qwen3 / Qwen3-MoE classes, offline loading
        "transformers>=4.57.6,<5",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout"],
        # Transformer Engine for GPU machines without a container that has it: the version
        # megatron-core 0.19 is built and tested with (its uv metadata: transformer-engine
        # 2.17.1; its `te` extra leaves the version open). Needs a CUDA torch already installed.
        "gpu": ["transformer-engine[pytorch]~=2.17.0"],
    },
    entry_points={"console_scripts": ["megatron-ntp=megatron_ntp.cli:main"]},
)
