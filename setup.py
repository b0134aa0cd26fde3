from setuptools import find_packages, setup

setup(
    name="optimal-sampling",
    version="0.1.0",
    description="verl recipe: RL rollouts sampled from the KL-balanced geometric mixture of policy and teacher",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["recipe", "recipe.*"]),
    package_data={"recipe.optimal_sampling": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        # verl 0.9.1 pins transformers >=5.5.3,<5.11; we stay inside that range so both share one environment.
        "transformers>=5.5.3,<5.11",
        "numpy",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff"],
        # The `dual` rollout backend for verl's PPO/GRPO trainer. The verl-core extra brings what 0.9.1 imports at
        # run time (TransferQueue, cachetools, uvicorn, fastapi, pyzmq, msgspec); plain `verl` lacks them.
        "verl": ["verl[verl-core]==0.9.1", "pandas", "pyarrow"],
    },
    entry_points={
        "console_scripts": ["optimal-sampling=recipe.optimal_sampling.cli:main"],
        # Loaded by `import verl` in every verl process: registers rollout name `dual` (lazy loaders only).
        "verl.plugins": ["optimal_sampling = recipe.optimal_sampling.verl.plugin"],
    },
)
