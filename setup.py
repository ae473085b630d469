"""grc_jax: one decoder LLM that generates, embeds and compresses text (GRC), in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="grc_jax",
    version="0.1.0",
    description="GRC in JAX/Flax: generation, retrieval embeddings and latent-memory compression "
    "from one forward pass, with Pallas serving kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["grc_jax", "grc_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        # Tested: jax 0.10.2 (CPU, Python 3.11); the GPU machines run jax 0.11.x on Python 3.12.
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tokenizers>=0.23.1,<0.24",
        "safetensors>=0.8.0,<0.9",
        "tensorboard>=2.21,<3",
        "tensorboardX>=2.6.5,<3",  # TensorFlow-free event writer
        "ml_collections>=1.1.0",
        "absl-py>=2.5",
        "numpy>=2.0,<3",
        # python -m grc_jax.evaluate. Tested: pytrec-eval-terrier 0.5.11, matplotlib 3.11.2, tqdm 4.70.1.
        "pytrec-eval-terrier>=0.5.11,<0.6",  # trec_eval's IR metrics, as BEIR and BRIGHT compute them
        "matplotlib>=3.11,<4",
        "tqdm>=4.70,<5",
    ],
    extras_require={
        "test": ["pytest>=9.0,<10", "pytest-xdist>=3.6,<4", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "pyyaml>=6.0",
                 "ruff>=0.17.6,<0.18"],  # lint rules move between ruff minor versions
        # Exact pin: an unpinned torch pulls several GB of CUDA wheels.
        "hf": ["torch==2.13.0", "transformers>=5.23.0,<6", "tokenizers>=0.23.1,<0.24"],
        # jax_triton fails to import without a GPU jaxlib: only ever imported lazily.
        "gpu": ["jax[cuda12]>=0.10.2,<0.12", "jax-triton>=0.3.1"],
        "seqio": ["seqio>=0.0.20"],  # pulls all of TensorFlow; strictly optional
    },
)
