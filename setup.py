"""Install fastssl. The top-level ``kernels/`` and ``benchmarks/`` folders install as
``fastssl.kernels`` and ``fastssl.benchmarks``: nothing installs a top-level ``kernels`` module
(Hugging Face's ``kernels`` package owns that name and transformers imports it when present)."""
from setuptools import setup

setup(
    name="fastssl",
    version="0.1.0",
    description="Fused Triton kernels for self-supervised and generative learning in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastssl", "fastssl.kernels", "fastssl.benchmarks"],
    package_dir={"fastssl": "fastssl", "fastssl.kernels": "kernels", "fastssl.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.5",
        "triton>=3.2; platform_system == 'Linux'",
        # Triton 3.6's interpreter (TRITON_INTERPRET=1, how the kernels are tested without a GPU)
        # breaks with numpy 2.4 ("only 0-dimensional arrays can be converted"); 3.8+ does not.
        "numpy>=1.24,<2.4",
    ],
    extras_require={
        # diffusers and pytorch-metric-learning are parity references in the tests (no torchvision needed).
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.7", "tqdm>=4.60",
                 "diffusers>=0.30", "pytorch-metric-learning>=2", "scikit-learn>=1.3", "scikit-image>=0.21"],
        # The benchmark's peers that install without torchvision (lightly, open_clip: see "peers").
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "diffusers>=0.30", "pytorch-metric-learning>=2"],
        # fastssl train: the embedded data sets (scikit-learn's digits, scikit-image's sample photos).
        "train": ["scikit-learn>=1.3", "scikit-image>=0.21", "matplotlib>=3.7", "tqdm>=4.60"],
        # Optional comparisons; lightly and open_clip need torchvision, which pins its own torch build.
        "peers": ["lightly", "pytorch-metric-learning", "open-clip-torch", "diffusers"],
    },
    entry_points={"console_scripts": ["fastssl=fastssl.cli:main"]},
)
