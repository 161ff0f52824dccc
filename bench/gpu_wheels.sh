#!/usr/bin/env bash
# Builds the packages a lent GPU machine lacks, on a machine with a package index (docs/gpu.md). The GPU machines
# have no index and take at most 64 MiB a call (the working tree included), so what they lack travels slimmed and
# split, in git-ignored folders named in the device tool's `carry`:
#
#   bash bench/gpu_wheels.sh ray    # .whl/ (~32 MB): Ray 2.60 slimmed to a tar.xz, and the wheels of the Ray
#                                   # dependencies the machines' image lacks. gpu_check.sh installs it.
#   bash bench/gpu_wheels.sh vllm   # .whl-vllm/ (~101 MB, three calls): vLLM 0.26.0 and the dependencies the
#                                   # image lacks, slimmed to one tar.xz cut in parts of at most 45 MiB, and their
#                                   # sha256. gpu_check.sh puts them together and unpacks them where VLLM=1.
#
# vLLM 0.26.0 is the newest release built for the image's torch (2.11.0, CUDA 13; 0.28 and later pin torch
# 2.13). Left out of its wheel: FlashAttention 2's kernels (305 MB; vLLM takes FlashAttention 3 on Hopper, the
# lent H100 and H200), the MoE kernels (47 MB; imported only if present, and only MoE models use them) and the
# DeepGEMM builds for other Pythons. The dependency list was found by importing vLLM's offline path (LLM, the V1
# engine core, the GPU worker and model runner, the Llama and GPT-2 models, FlashAttention, the sampler: 23
# modules) with this tarball alone beside the image's packages (docs/gpu.md). FlashInfer is not among them, so
# gpu_check.sh sets VLLM_USE_FLASHINFER_SAMPLER=0 (vLLM's PyTorch sampler).
# PYVER (default 3.12, the machines' Python) picks the wheels' Python: PYVER=3.11 builds the same set for a try
# on this machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
download() {  # wheels for the machines' Python and platform, without their dependencies; a miss stops the script
  local dest=$1 log
  shift
  log=$(mktemp)
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@" >"$log" 2>&1; then
    grep -v "WARNING: Location" "$log" >&2
    exit 1
  fi
  rm -f "$log"
}
exclude() {  # the folder must stay out of git (and so out of what travels, unless carried)
  grep -qxF "/$1/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo "/$1/" >>.git/info/exclude; }
}
pack() {  # pack OUT WHEEL... [-- DROP...]: unpack the wheels together, drop the DROP paths, write a tar.xz
  local out=$1 tmp
  shift
  tmp=$(mktemp -d)
  while [ $# -gt 0 ] && [ "$1" != -- ]; do unzip -q -o "$1" -d "$tmp"; shift; done
  [ $# -gt 0 ] && shift
  (cd "$tmp" && for p in "$@"; do rm -rf $p; done && tar -cf - ./* | xz -T0 -6 >"$OLDPWD/$out")
  rm -rf "$tmp"
}

vllm_deps() {  # the wheels of vLLM's dependencies that the image lacks, into $1
  # Pinned where vLLM pins them, else to releases of its time (openai 2.x: 3.x needs httpx2; xgrammar 0.2.3
  # matches apache-tvm-ffi 0.1.10, which vLLM pins; fastapi below 0.137, as vLLM asks).
  download "$1" cbor2==6.3.0 msgspec==0.22.0 pyzmq==27.3.0 pybase64==1.5.1 cachetools==8.0.2 \
    openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.8 fastapi==0.136.3 \
    starlette==1.10.0 opentelemetry-api==1.45.2 partial-json-parser==0.2.1.1.post7 llguidance==1.7.6 \
    xgrammar==0.2.3 apache-tvm-ffi==0.1.10 depyf==0.20.0 astor==0.8.1 dill==0.4.1 setproctitle==1.3.8 \
    blake3==1.0.11
}

case "${1:-}" in
ray)
  exclude .whl
  rm -rf .whl && mkdir -p .whl
  download .whl ray==2.60.0 jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 \
    rpds-py==2026.9.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    tensorboardX==2.6.5
  pack .whl/ray_slim.tar.xz .whl/ray-2.60.0-*.whl -- ray/jars ray/rllib ray/serve ray/llm "ray/dashboard/client/build/static/*/*.map"
  rm .whl/ray-2.60.0-*.whl
  ;;
vllm)
  exclude .whl-vllm
  rm -rf .whl-vllm && mkdir -p .whl-vllm/wheels
  download .whl-vllm/wheels vllm==0.26.0
  vllm_deps .whl-vllm/wheels
  [ "$(ls .whl-vllm/wheels/*.whl | wc -l)" = 23 ] || { echo "expected vLLM and 22 wheels" >&2; exit 1; }
  # One tar.xz of vLLM and its dependencies, unpacked as pip --target would (the one data folder, dill's, holds
  # scripts nothing runs), less what the offline engine on a Hopper GPU never loads; xgrammar's static library
  # (65 MB) is for building against it.
  pack .whl-vllm/vllm_slim.tar.xz .whl-vllm/wheels/*.whl -- vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so \
    vllm/_moe_C_stable_libtorch.abi3.so "vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so" xgrammar/lib
  rm -rf .whl-vllm/wheels
  split -b 45M -d .whl-vllm/vllm_slim.tar.xz .whl-vllm/vllm_slim.tar.xz.part
  rm .whl-vllm/vllm_slim.tar.xz
  (cd .whl-vllm && sha256sum vllm_slim.tar.xz.part* >parts.sha256)  # gpu_check.sh checks the parts it gathered
  ;;
*)
  echo "usage: bash bench/gpu_wheels.sh ray|vllm" >&2
  exit 2
  ;;
esac
if [ "$1" = ray ]; then du -ah .whl; else du -ah .whl-vllm; fi | sort -h
