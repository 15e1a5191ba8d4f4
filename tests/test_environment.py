"""library_versions(): the installed versions of the libraries that decide output bytes."""

from __future__ import annotations

from importlib import metadata

import numpy
import pyarrow
import torch
from packaging.version import Version

from pipeline.core.environment import OUTPUT_LIBRARIES, library_versions

# Written out again on purpose: a change to the list in pipeline/core/environment.py must be seen here.
EXPECTED = set("numpy scipy pyarrow torch scikit-learn gguf safetensors tokenizers matplotlib".split())


def test_names_exactly_the_libraries_that_decide_output_bytes():
    versions = library_versions()
    assert set(versions) == EXPECTED
    assert list(versions) == list(OUTPUT_LIBRARIES)


def test_no_blas_library_or_kernel_is_recorded():
    # Outputs must not depend on the BLAS build, so its name never enters provenance.
    names = " ".join(library_versions()).lower()
    assert not any(word in names for word in ("blas", "mkl", "lapack", "threadpoolctl"))


def test_versions_are_the_installed_distributions_exact_versions():
    versions = library_versions()
    for name, version in versions.items():
        assert version == metadata.version(name)
        assert str(Version(version)) == version, f"{name} {version} is not a normalized version"
    # The same versions the imported modules report, local build labels included.
    assert versions["numpy"] == numpy.__version__
    assert versions["pyarrow"] == pyarrow.__version__
    assert versions["torch"] == torch.__version__


def test_is_a_plain_dict_of_strings_and_the_same_every_call():
    first, second = library_versions(), library_versions()
    assert first == second and first is not second
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in first.items())


def test_provenance_records_the_library_versions(tmp_path):
    import numpy as np

    from pipeline.core.environment import library_versions
    from pipeline.core.parquet import derived_provenance

    from builders import write_embeddings

    embeddings = write_embeddings(tmp_path / "m" / "embeddings.parquet", np.eye(3, dtype=np.float32))
    package = derived_provenance("stats", "m", embeddings, {})["package"]
    assert package["name"] == "embedding-dissect" and package["libraries"] == library_versions()
