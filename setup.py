"""klip_jax: FUSAR-KLIP knowledge-guided SAR vision-language pretraining in JAX/Flax."""

from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"
# HF BLIP export/import (klip export, klip import-hf) and its parity tests. torch is pinned
# exactly: a looser spec can pull a multi-GB CUDA build.
# transformers: the version the export is tested with (custom_generate/, the tokenizer conversion).
EXPORT = ["torch==2.13.0", "transformers>=5.24", "safetensors>=0.4", "pyyaml>=5.1"]
# libtpu (~700 MB, Linux x86-64 only): TPU slices described on a CPU host, so `klip compile` and
# its tests compile for TPUs anywhere. Installed, it costs plain CPU jax nothing at startup.
TPU = [f"jax[tpu]=={JAX_VERSION}"]
# gs:// workdirs (klip_jax/io.py): gcsfs, through etils' epath-gcs extra, for the files klip_jax
# and orbax write through etils.epath (orbax's arrays go through tensorstore, which talks to GCS
# itself); google-cloud-storage for tensorboardX's event files. Datasets stay local (data/builder.py).
GCS = ["etils[epath-gcs]>=1.7", "google-cloud-storage>=2.14"]

setup(
    name="klip-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of FUSAR-KLIP (SAR vision-language pretraining with SCIO)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ ships inside the package as klip_jax.configs, so `klip` finds its configs from
    # any working directory and in non-editable installs too.
    packages=[*find_packages(include=["klip_jax", "klip_jax.*"]), "klip_jax.configs", "klip_jax.configs.sweeps"],
    package_dir={"klip_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "array-record==0.8.6",
        "tensorflow-datasets==4.9.10",
        "importlib-resources>=6.0",  # imported by tfds builders, not declared by tfds
        "sentencepiece==0.2.3",
        "einops==0.8.2",
        "ml-collections==1.1.0",
        "absl-py>=2.1",
        "etils[epath]>=1.7",  # klip_jax.io: atomic writes on local or bucket paths
        "tqdm>=4.66",
        "numpy>=1.26",
        "scipy>=1.11",
        "pillow>=10.0",
        "pyproj>=3.6",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "rasterio>=1.3",  # GeoTIFF ingest of real chips
        "scikit-learn>=1.4",  # benchmark probes and metrics
        "threadpoolctl>=3.1",
        "pycocotools>=2.0.7",  # detection mAP
        "pycocoevalcap>=1.2",  # captioning BLEU / CIDEr
    ],
    extras_require={
        # pytest 9.2's structured node ids drop pytest-xdist's xdist_group suffix, so
        # --dist loadgroup stops grouping (pytest-xdist#1386, fix pending): tests/conftest.py
        # says so if it happens.
        "test": ["pytest>=8.0,<9.2", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff==0.17.6", *EXPORT,
                 *(f"{r}; sys_platform == 'linux' and platform_machine == 'x86_64'" for r in TPU)],
        "export": EXPORT,
        "tpu": TPU,
        "gcs": GCS,
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
    },
    entry_points={"console_scripts": ["klip=klip_jax.cli:run"]},
)
