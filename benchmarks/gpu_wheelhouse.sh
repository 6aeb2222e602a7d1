#!/usr/bin/env bash
# Build .whl/: the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no internet. Run it here (where pip
# reaches PyPI), from anywhere in the repository; .whl/ is added to .git/info/exclude (ignored by git, yet it can be
# carried to the device machine by naming it).
#
#   bash benchmarks/gpu_wheelhouse.sh                 # ~57 MiB: fits the device tool's 64 MiB working-tree limit
#   PYTHON_VERSION=3.11 bash benchmarks/gpu_wheelhouse.sh
#   bash benchmarks/gpu_wheelhouse.sh --deepspeed     # + ~4.8 MiB: deepspeed and the needs the GPU image lacks, for
#                                                     # gpu_check.sh's ZeRO-2/3 checks (~62.5 MiB: close to the limit)
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
# DeepSpeed (--deepspeed): PyPI has only its source; DS_BUILD_OPS=0 builds a pure-Python wheel (ops compile at run time
# if ever needed; ZeRO-2/3 with the Trainer's optimizer needs none). Its needs the GPU image lacks: hjson, pydantic
# (+ pydantic-core, annotated-types, typing-inspection, typing-extensions >= 4.16); einops, msgpack, ninja, psutil,
# py-cpuinfo, tqdm are there.
DEEPSPEED=0
for arg in "$@"; do
  case "$arg" in
    --deepspeed) DEEPSPEED=1 ;;
    *) echo "gpu_wheelhouse.sh: unknown argument $arg (use --deepspeed to add DeepSpeed)" >&2; exit 2 ;;
  esac
done
if [[ "$DEEPSPEED" == 1 ]]; then
  PACKAGES+=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
             typing-extensions==4.16.0)
fi

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PACKAGES[@]}"
if [[ "$DEEPSPEED" == 1 ]]; then
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps -w .whl deepspeed==0.19.8
fi
du -ch .whl/*.whl | tail -1
echo "carry it: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
