"""The exact versions of the libraries that decide the bytes of the pipeline's outputs.

pyarrow writes its own version into every Parquet footer; numpy, scipy, torch and
scikit-learn choose kernels and summation orders; gguf encodes and dequantizes the block
formats; safetensors and tokenizers read the weights and the vocabulary; matplotlib draws
the PNGs. The BLAS library and its kernel are deliberately not listed: no output may depend
on them.
"""

from __future__ import annotations

from importlib import metadata

# Distribution names as installed (and as pinned in requirements.lock).
OUTPUT_LIBRARIES = (
    "numpy",
    "scipy",
    "pyarrow",
    "torch",
    "scikit-learn",
    "gguf",
    "safetensors",
    "tokenizers",
    "matplotlib",
)


def library_versions() -> dict[str, str]:
    """{distribution name: installed version} of OUTPUT_LIBRARIES, in that order.

    The version is the installed distribution's own (``2.13.0+cpu`` for a CPU build of
    torch), read from its metadata without importing it.
    """
    return {name: metadata.version(name) for name in OUTPUT_LIBRARIES}
