"""isofast: fast isometric regularisation for PyTorch."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="isofast",
    version="0.1.0",
    description="Fast geometry-preserving (isometric) regularisation of autoencoders and generators",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["isofast", "isofast.*"]),
    package_data={"isofast": ["py.typed"]},
    install_requires=["torch>=2.3", "numpy"],
    extras_require={
        "train": ["matplotlib", "scikit-learn", "tqdm"],
        "test": ["pytest", "matplotlib", "scikit-learn", "tqdm"],
    },
    entry_points={"console_scripts": ["isofast = isofast.cli:main"]},
)
