#!/usr/bin/env bash
# Install recbole-reason into the active Python (3.10 - 3.13) without ray.
# RecBole 1.2.1 pins ray<=2.6.3 (no wheels for Python >= 3.12) but recbole-reason never imports ray:
# RecBole is installed with --no-deps and its real runtime needs come from requirements/no_ray.txt.
#   usage:  python3.12 -m venv .venv && . .venv/bin/activate && bash requirements/install_no_ray.sh [--test]
#   TORCH_SPEC overrides the torch requirement (default "torch>=2.6"; e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "${TORCH_SPEC:-torch>=2.6}"
python -m pip install -q -r requirements/no_ray.txt
python -m pip install -q --no-deps "recbole==1.2.1"
python -m pip install -q --no-deps -e .
if [[ "${1:-}" == "--test" ]]; then python -m pip install -q "pytest>=7"; fi
python -c "import recbole_reason, recbole, torch, sys; print('recbole-reason OK on Python', sys.version.split()[0], '| torch', torch.__version__, '| recbole', recbole.__version__)"
