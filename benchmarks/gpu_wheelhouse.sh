#!/usr/bin/env bash
# Build .whl/: the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no internet. Run it here (where pip
# reaches PyPI), from anywhere in the repository; .whl/ is added to .git/info/exclude (ignored by git, yet it can be
# carried to the device machine by naming it).
#
#   bash benchmarks/gpu_wheelhouse.sh                 # ~57 MiB: fits the device tool's 64 MiB working-tree limit
#   PYTHON_VERSION=3.11 bash benchmarks/gpu_wheelhouse.sh
#
# What the GPU image lacks or has in another version (its recorded pip list: torch 2.11+cu130, transformers 5.17,
# accelerate 1.15, tokenizers 0.23.2, huggingface_hub 1.33, no bitsandbytes, trl or datasets): the versions this
# project is tested with. torch, numpy, pyarrow, pandas, tokenizers, safetensors and accelerate are used as found
# there (pyarrow alone would be 55 MB; datasets asks for pyarrow >= 24).
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PACKAGES=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 bitsandbytes==0.50.2 dill==0.4.1
          multiprocess==0.70.19 fsspec==2026.9.0 liger-kernel==0.8.5)  # liger: the --use_liger_kernel A/B

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PACKAGES[@]}"
du -ch .whl/*.whl | tail -1
echo "carry it: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
