"""horovod-squeeze: error-compensated compressed communication for Horovod."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

setup(
    name="horovod-squeeze",
    version="0.1.0",
    description="Error-compensated compression (DoubleSqueeze and friends) for Horovod, "
                "PyTorch and TensorFlow/Keras",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["horovod_squeeze", "horovod_squeeze.*"]),
    install_requires=["numpy>=1.23"],
    extras_require={
        "torch": ["torch>=2.0", "horovod==0.28.1"],
        "tensorflow": ["tensorflow-cpu>=2.16", "tf_keras>=2.16", "horovod==0.28.1"],
        "decentralized": ["mpi4py>=3.1"],  # neighbour collectives (DecentralizedOptimizer)
        "dev": ["pytest>=7", "mpi4py>=3.1", "scikit-learn", "tqdm", "matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: System :: Distributed Computing",
    ],
)
