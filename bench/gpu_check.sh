#!/usr/bin/env bash
# The GPU check: one script, run on a lent CUDA machine (the device tool; see docs/gpu.md for how and what it
# found). It runs, each step independent of the others' success:
#   1. the gpu test tier (tests/test_gpu.py): CUDA math equals CPU math, bf16 autocast, the training step;
#   2. bench/gpu_speed.py: matmul ceiling, training-step throughput and MFU (bf16), hf generation vs a bare loop;
#   3. the whole pipeline on the GPU through Ray: Ray Train with NCCL and bf16 autocast for SFT and DoRA training,
#      classifier training and scoring, reference log-probs and generation on GPU actors, then evaluation;
#   4. (RUN_PRESET=1) bench/gpu_preset.py: the KLDPO LoRA preset at Llama-3.1-8B's shape (random weights) through
#      the validate, reference and train stages, for PRESET_ARGS (default: 150 steps, and --timeout 420: seconds
#      for the whole script, the summary included): throughput and MFU.
#      PRESET_ARGS="--preset dora --steps 100" runs the DoRA preset's LoRA setting instead (adds classify).
#      LOGPROB_CHUNK=N adds --set model.logprob_chunk=N (issue 26: the LM head's log-probs N tokens at a time, so a
#      larger micro-batch fits; give it with PRESET_ARGS="--batch M --micro-batch M", docs/gpu.md's next session).
#   5. (VLLM=1) the vllm test tier (tests/test_vllm.py) on the GPU, then vLLM against raydora's hf backend and a
#      bare generate loop (python -m bench.gpu_speed --generation-only, VLLM_ARGS), with vLLM 0.26.0 from .whl-vllm/
#      (bench/gpu_wheels.sh vllm; its parts may have come in earlier calls and been copied to /tmp/vparts,
#      docs/gpu.md).
# SKIP_TESTS=1 leaves out the test tiers (steps 1 and 5's); SKIP_BENCH=1 and SKIP_PIPELINE=1 steps 2 and 3.
# Logs and results go to $OUT (default /tmp/gpu-check). The machine has no package index: Ray and its missing
# dependencies travel in .whl/ (a slimmed Ray 2.60 tarball and wheels; docs/gpu.md says how they were made).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=1
PY=${PY:-python3}
export PYTHONPATH=/tmp/site:$PWD  # what travels in .whl/ and .whl-vllm/ is unpacked there
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  [ -f .whl/ray_slim.tar.xz ] && tar -xJf .whl/ray_slim.tar.xz -C /tmp/site
fi
if [ -n "${VLLM:-}" ]; then  # vLLM's slimmed tree, from parts carried in this call or copied in earlier ones
  mkdir -p /tmp/vparts
  cp .whl-vllm/vllm_slim.tar.xz.part* /tmp/vparts/ 2>/dev/null
  if (cd /tmp/vparts && sha256sum -c --quiet "$OLDPWD/.whl-vllm/parts.sha256"); then
    mkdir -p /tmp/site && cat /tmp/vparts/vllm_slim.tar.xz.part* | xz -dc | tar -xf - -C /tmp/site
  else
    echo "vLLM's parts are missing or damaged in /tmp/vparts: step 5 will fail"
  fi
  export VLLM_USE_FLASHINFER_SAMPLER=0  # FlashInfer does not travel: vLLM's PyTorch sampler
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
$PY -c "import ray; print('ray', ray.__version__)" || echo "ray missing: step 3 will fail"
summary=()

echo "== 1. gpu test tier"
if [ -n "${SKIP_TESTS:-}" ]; then
  summary+=("gpu tests: skipped (SKIP_TESTS)")
else
  timeout 120 $PY -m pytest -q -p no:logging -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
  summary+=("gpu tests: rc=${PIPESTATUS[0]} $(tail -1 "$OUT/pytest_gpu.log")")
fi

echo "== 2. bench/gpu_speed.py"
if [ -n "${SKIP_BENCH:-}" ]; then
  summary+=("gpu_speed: skipped (SKIP_BENCH)")
else
  timeout 150 $PY -m bench.gpu_speed --out "$OUT" 2>&1 | grep -v "Loading weights" | tee "$OUT/gpu_speed.log"
  summary+=("gpu_speed: rc=${PIPESTATUS[0]}")
fi

echo "== 3. pipeline on the GPU (Ray Train NCCL + bf16, GPU actor pools)"
if [ -n "${SKIP_PIPELINE:-}" ]; then
  summary+=("pipeline: skipped (SKIP_PIPELINE)")
else
  start=$(date +%s)
  timeout "${PIPELINE_TIMEOUT:-270}" $PY -m raydora.cli pipeline --config jobs/configs/demo_cpu.yaml \
    name=gpu root=/tmp/runs ray.num_cpus=16 model.precision=auto \
    train.use_gpu=true train.num_workers=1 sft.num_workers=1 \
    classifier.device=cuda classifier.score_actors=1 reference.device=cuda reference.actors=1 \
    generate.device=cuda generate.actors=1 generate.actor_cpus=2 ${PIPELINE_ARGS:-} 2>&1 \
    | grep -v -E "Loading weights|row/s\]|^\s*$" | tee "$OUT/pipeline.log"
  summary+=("pipeline: rc=${PIPESTATUS[0]} in $(($(date +%s) - start)) s")
  cp /tmp/runs/gpu/train/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
  cp /tmp/runs/gpu/eval/report.md "$OUT/eval_report.md" 2>/dev/null
  cp /tmp/runs/gpu/generations/policy/_SUCCESS "$OUT/generate_policy_SUCCESS.json" 2>/dev/null
fi

if [ -n "${RUN_PRESET:-}" ]; then
  echo "== 4. bench/gpu_preset.py (a LoRA preset, Llama-3.1-8B shape, random weights): ${PRESET_ARGS:-}"
  start=$(date +%s)
  # gpu_preset.py keeps to its own --timeout (default 420 s, the whole script); the outer timeout only backs it
  # up. If it still fires, `python -m bench.gpu_preset --summarize $OUT` rebuilds the summary from the files
  # copied below.
  inner=$(sed -n 's/.*--timeout[ =]\([0-9]*\).*/\1/p' <<<"${PRESET_ARGS:-}")
  chunk_args=${LOGPROB_CHUNK:+--set model.logprob_chunk=$LOGPROB_CHUNK}
  timeout "${PRESET_TIMEOUT:-$((${inner:-420} + 30))}" $PY -m bench.gpu_preset --out "$OUT" --work /tmp/preset \
    ${PRESET_ARGS:-} $chunk_args 2>&1 | grep -v -E "Loading weights|Writing model shards" | tee "$OUT/gpu_preset.log"
  summary+=("gpu_preset${LOGPROB_CHUNK:+ (logprob_chunk=$LOGPROB_CHUNK)}: rc=${PIPESTATUS[0]} in $(($(date +%s) - start)) s")
  cp /tmp/preset/runs/preset/train/metrics.jsonl "$OUT/preset_metrics.jsonl" 2>/dev/null
  cp /tmp/preset/pipeline.log "$OUT/preset_pipeline.log" 2>/dev/null
  cp /tmp/preset/meta.json "$OUT/preset_meta.json" 2>/dev/null
  cp /tmp/preset/gpu_peak_mib "$OUT/preset_gpu_peak_mib" 2>/dev/null
  cp /tmp/preset/runs/preset/classifier/_SUCCESS "$OUT/preset_classifier_SUCCESS.json" 2>/dev/null
fi

if [ -n "${VLLM:-}" ]; then
  echo "== 5. the vllm test tier on the GPU, then vLLM against the hf backend and a bare loop (python -m bench.gpu_speed --generation-only)"
  $PY -c "import vllm; print('vllm', vllm.__version__)"
  if [ -z "${SKIP_TESTS:-}" ]; then
    timeout "${VLLM_TESTS_TIMEOUT:-240}" $PY -m pytest -q -p no:logging -m vllm tests/test_vllm.py 2>&1 \
      | grep -v "Loading weights" | tee "$OUT/pytest_vllm.log"
    summary+=("vllm tests: rc=${PIPESTATUS[0]} $(tail -1 "$OUT/pytest_vllm.log")")
  fi
  start=$(date +%s)
  timeout "${VLLM_TIMEOUT:-300}" $PY -m bench.gpu_speed --generation-only --out "$OUT" ${VLLM_ARGS:-} 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/gpu_vllm.log"
  summary+=("vllm: rc=${PIPESTATUS[0]} in $(($(date +%s) - start)) s")
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
grep -E "TFLOP|pairs/s|^(mfu|packed|precomputed|dora|kldpo|wdpo|hf_engine)" "$OUT/gpu_speed.log" 2>/dev/null | head -20
grep -E "^round|_vs_" "$OUT/gpu_vllm.log" 2>/dev/null
grep -E "^\[|win|report:" "$OUT/pipeline.log" 2>/dev/null | tail -15
