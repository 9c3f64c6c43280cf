from setuptools import find_packages, setup

# torch and megatron-core are pinned and installed by tools/install.sh (megatron-core 0.19.2
# must be installed with --ignore-requires-python on Python 3.11, which setup.py cannot express).
setup(
    name="megatron_ntp",
    version="0.1.0",
    description="Pretraining with a generalized (shaped) next-token loss on megatron-core",
    packages=find_packages(include=["megatron_ntp", "megatron_ntp.*"]),
    package_data={"megatron_ntp.loss": ["csrc/*.cpp"]},
    python_requires=">=3.11",
    install_requires=[
        "torch==2.13.0",
        "numpy<3",
        "pyyaml",
        "sentencepiece",
        "tokenizers",
        "matplotlib",
        "scipy",
        "threadpoolctl",  # one BLAS thread for the tiny L-BFGS-B problems of scaling-law fits
        "tensorboard",
        "ninja",  # torch's extension builder (the CPU top-k scan, megatron_ntp/loss/csrc)
        # Hugging Face export (megatron_ntp/export): Qwen3 / Qwen3-MoE classes, offline loading
        "transformers==4.57.6",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megatron-ntp=megatron_ntp.cli:main"]},
)
