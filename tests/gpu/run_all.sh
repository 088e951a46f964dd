#!/usr/bin/env bash
# The GPU run, in one command, from a fresh NVIDIA machine with torch + triton + transformers:
#
#   tests/gpu/run_all.sh [STEP ...]      STEPs: kernels greedy g4 g4-sweep g1 g1-hallm g1-llama g4-llama g4-steps g4-decoder g2 g2-long linear linear-fused linear-decode moe profile profile-engine profile-host profile-launch host-overhead conformance served kv and those below (default:
#                                        kernels greedy g4 g1)
#
# kernels   tests/gpu/test_triton_gpu.py: every Triton kernel variant compiled and run against
#           hallm.ops.reference for every dtype the CUDA platform declares on this GPU; and
#           tests/gpu/test_skinny_gemm_gpu.py: the decode projections' skinny GEMM
# greedy    tests/gpu/test_engine_gpu.py: the engine on the GPU vs HF transformers on the same
#           weights (tiny models in float32, graphs on and off; a Qwen2.5-0.5B-shaped model in bf16)
# g4        benchmarks/gpu_g4.py: copy bandwidth, attention-kernel bandwidth, decode steps of both models vs roofline
# g4-sweep  the same for Qwen2.5-0.5B with the segment and tile sweeps and the steps on the reference ops (tuning)
# g1        benchmarks/gpu_g1.py: offline throughput, hallm vs HF continuous batching vs HF padded
# g4-decoder  Qwen2.5-0.5B's decode steps with and without the fused decoder stack, and with cuBLAS projections (benchmarks/variants.py)
# g2        benchmarks/gpu_g1.py --fixed-len 1024,1024: Llama-3.1-8B, 512 requests, vs the decode roofline
# tp-greedy tests/gpu/test_tp_gpu.py: TP=2 (mp and ray executors, NCCL) vs HF, Qwen2.5-0.5B and Llama-3.1-8B layer shapes, bf16 (two GPUs)
# tp-g2     G2 (Llama-3.1-8B, 512 requests, 1024 in / 1024 out) at TP=2 on mp and on ray, vs the roofline of both GPUs (two GPUs)
# g2-long   the same with 3584 requests (~7 minutes of generation: about the most one 10-minute device call holds)
# linear    benchmarks/gpu_linear.py: the skinny GEMM vs cuBLAS on both models' projections, 1-64 rows
# moe       tests/gpu/test_fused_moe_gpu.py and benchmarks/gpu_moe.py: the Triton fused MoE against the
#           reference, then Qwen3-30B-A3B's MoE layer at decode batch 1/32/128 vs its bytes floor and the reference
# linear-fused  the fused decoder stack's qkv launch (norm prologue, rotary epilogue) vs the kernels it replaces (--fused)
# linear-decode  tests/gpu/test_decode_gemm_gpu.py, then benchmarks/gpu_decode_gemm.py: the decode-batch
#           GEMM (hallm.ops.triton.decode_gemm) vs cuBLAS on both models' qkv/o/gate_up/down at 128/192/256 rows,
#           shipped configuration and a tile/split sweep at 192 rows (~4 minutes on an H100)
# profile   benchmarks/gpu_step_profile.py: the kernels of Qwen2.5-0.5B's decode-graph replay at batch 1 and 32
# profile-host  cProfile of 64 decode steps of Qwen2.5-0.5B at batch 1 and 32, and the host's graph-launch cost with PDL on and off
# profile-launch  the host cost of a decode step's CUDA calls (graph launches, copies, lm_head, argmax) at batch 1/16/32, and without PDL
# structured-profile  benchmarks/structured_output.py at batch 8/32/64, then a torch profile of a plain
#           and a JSON-schema run at batch 64
# sampler   tests/gpu/test_sampling_gpu.py and the kit's temperature_sample check (the one-pass sampler on
#           the GPU), then benchmarks/gpu_sampler.py: the sampler's device time on Llama-3's vocabulary
#           (batch 1/32/192/512, temperature 0.6) with the one-pass op vs the torch path
# g2-anatomy-ab  g2-anatomy with the sampler's torch path (variant no-temperature-sample), to pair with g2-anatomy
# g2-decode-gemm  g2-anatomy with decode batches' projections through the decode GEMM (variant decode-gemm,
#           tuned by the decode-gemm.jsonl a linear-decode step wrote to $HALLM_GPU_RESULTS), to pair with g2-anatomy
# served-parse-ab  served-qwen (no py-spy) with every request body parsed on the worker pool (server
#           variant offloaded-parse), then as shipped (small bodies parsed on the event loop)
# mixed-graphs-ab  served-qwen (no py-spy) with CUDA graphs of decode steps alone (engine variant
#           decode-graphs: steps with prompt tokens run eagerly), then as shipped (graphs of both)
# server-gc-ab  served-qwen (no py-spy) with both server processes on the interpreter's young-collection
#           threshold (engine variant interpreter-gc), then as shipped (hallm.core.server_gc)
# api-servers-ab  served-qwen (no py-spy) with one API server process, then with two
#           (`hallm serve --api-server-count 2`), same offline reference run before each
# structured-masks  benchmarks/structured_masks.py: the host time of one step's masks, row by row vs
#           llguidance's thread pool, in isolation
# kv        tests/gpu/test_kv_connectors_gpu.py: the KV connectors under async scheduling vs HF, and the
#           conformance kit's KV connector round trips on the GPU (bit-exact blocks)
# step-budget  benchmarks/gpu_step_budget.py: offline Qwen2.5-0.5B, 256 x 1024/128, by max_num_batched_tokens (host wait, GPU busy share, top kernels)
# step-budget-host  the same at budget 2048 with a cProfile of one run
# host-overhead  benchmarks/host_overhead.py: the engine's host time per decode step by phase (tiny model, batch 1/32/256)
# served    benchmarks/gpu_served.py: offline (`hallm bench throughput`) vs served (`hallm serve` +
#           `hallm bench serve`) at saturation and at concurrency 1, 1024 in / 128 out, Qwen2.5-0.5B
#           (256 requests) and Llama-3.1-8B (128 requests; ~4 minutes for both on an H200)
# profile-engine  the same with --engine: whole engine decode steps split into graph, outside-graph and idle GPU time (Qwen at batch 1 and 32, Llama-3.1-8B at batch 1)
#
# Logs and JSON go to $HALLM_GPU_RESULTS, else $OUT (the device tool's folder), else
# benchmarks/results/raw. Wheels in .whl/ (built by tests/gpu/wheelhouse.sh: the server stack,
# the transformers version CI pins, httptools, uvloop, aiohttp, py-spy) are installed to
# /tmp/site first; hallm and hallm-cuda are installed editable without dependencies.
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0
RES=${HALLM_GPU_RESULTS:-${OUT:-benchmarks/results/raw}}
export HALLM_GPU_RESULTS=$RES
mkdir -p "$RES"
PY=${PYTHON:-python3}
STEPS=${*:-kernels greedy g4 g1}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# plugins/cpu is the conformance kit's L3 reference.
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/cuda -e plugins/cpu 2>&1 | tail -3
$PY - <<'PY' | tee "$RES/env.json"
import json, sys
sys.path.insert(0, ".")
from benchmarks.gpu_common import environment
from hallm_cuda.platform import CudaPlatform
env = environment()
env["probe"] = str(CudaPlatform.probe())
env["capabilities"] = str(CudaPlatform().capabilities())
print(json.dumps(env))
PY

# run NAME CMD...: the full log to $RES/NAME.log, its end to the console
run() {
  local name=$1; shift
  "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 60 "$RES/$name.log"
  echo "--- $name: exit $rc"
  [ $rc -eq 0 ] || status=1
}

status=0
for step in $STEPS; do
  echo "=== $step ==="
  case $step in
    kernels) run kernels $PY -m pytest -q -n 8 -p no:cacheprovider -rf tests/gpu/test_triton_gpu.py tests/gpu/test_skinny_gemm_gpu.py ;;
    greedy) run greedy $PY -m pytest -q -n 3 -p no:cacheprovider -rf tests/gpu/test_engine_gpu.py ;;
    g4) run g4 $PY benchmarks/gpu_g4.py --out "$RES" --models qwen2.5-0.5b,llama-3.1-8b ;;
    g4-sweep) run g4-sweep $PY benchmarks/gpu_g4.py --out "$RES" --models qwen2.5-0.5b --sweep --sweep-tiles --ab reference-ops ;;
    g4-llama) run g4-llama $PY benchmarks/gpu_g4.py --out "$RES" --models llama-3.1-8b --parts step ;;
    g4-steps) run g4-steps $PY benchmarks/gpu_g4.py --out "$RES" --models qwen2.5-0.5b,llama-3.1-8b --parts step ;;
    g1) run g1 $PY benchmarks/gpu_g1.py --out "$RES" --model qwen2.5-0.5b ;;
    g1-hallm) run g1-hallm $PY benchmarks/gpu_g1.py --out "$RES" --model qwen2.5-0.5b --systems hallm ;;
    g2) run g2 $PY benchmarks/gpu_g1.py --out "$RES" --model llama-3.1-8b --systems hallm --num-seqs 512 --fixed-len 1024,1024 --max-num-seqs 192 --timeout 540 --num-iters 1 ;;
    tp-greedy) run tp-greedy $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_tp_gpu.py ;;
    tp-g2) run tp-g2-mp $PY benchmarks/gpu_g1.py --out "$RES" --model llama-3.1-8b --systems hallm --num-seqs 512 --fixed-len 1024,1024 --max-num-seqs 192 --timeout 270 --num-iters 1 -tp 2 --distributed-executor-backend mp
           run tp-g2-ray $PY benchmarks/gpu_g1.py --out "$RES" --model llama-3.1-8b --systems hallm --num-seqs 512 --fixed-len 1024,1024 --max-num-seqs 192 --timeout 270 --num-iters 1 -tp 2 --distributed-executor-backend ray ;;
    g1-harness) run g1-harness $PY benchmarks/gpu_g1.py --out "$RES" --model qwen2.5-0.5b --systems hallm --text --num-iters 3 ;;
    g4-decoder) run g4-decoder $PY benchmarks/gpu_g4.py --out "$RES" --models qwen2.5-0.5b --parts copy,step --ab no-decoder-stack --ab no-skinny ;;
    g2-long) run g2-long $PY benchmarks/gpu_g1.py --out "$RES" --model llama-3.1-8b --systems hallm --num-seqs 3584 --fixed-len 1024,1024 --max-num-seqs 192 --timeout 570 ;;
    g1-llama) run g1-llama $PY benchmarks/gpu_g1.py --out "$RES" --model llama-3.1-8b --hf-cb-requests 16 --hf-padded-requests 32 --hf-batch-size 32 ;;
    linear) run linear $PY benchmarks/gpu_linear.py --out "$RES" ;;
    moe) run moe-test $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_fused_moe_gpu.py
         run moe $PY benchmarks/gpu_moe.py --out "$RES" ;;
    linear-fused) run linear-fused $PY benchmarks/gpu_linear.py --out "$RES" --fused --rows 1,16 ;;
    linear-decode) run linear-decode-test $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_decode_gemm_gpu.py
                   run linear-decode $PY benchmarks/gpu_decode_gemm.py --out "$RES" ;;
    profile) run profile $PY benchmarks/gpu_step_profile.py --out "$RES" --model qwen2.5-0.5b --batches 1,32 ;;
    profile-engine) run profile-engine-qwen $PY benchmarks/gpu_step_profile.py --out "$RES" --model qwen2.5-0.5b --batches 1,32 --engine
                    run profile-engine-llama $PY benchmarks/gpu_step_profile.py --out "$RES" --model llama-3.1-8b --batches 1 --engine ;;
    profile-host) run profile-host-qwen $PY benchmarks/gpu_step_profile.py --out "$RES" --model qwen2.5-0.5b --batches 1,32 --host
                  run profile-host-qwen-nopdl $PY benchmarks/gpu_step_profile.py --out "$RES" --model qwen2.5-0.5b --batches 1 --variant no-pdl ;;
    profile-launch) run profile-launch $PY benchmarks/gpu_step_profile.py --out "$RES" --model qwen2.5-0.5b --batches 1,16,32 --launch-costs
                    run profile-launch-nopdl $PY benchmarks/gpu_step_profile.py --out "$RES" --model qwen2.5-0.5b --batches 1,32 --variant no-pdl ;;
    host-overhead) run host-overhead $PY benchmarks/host_overhead.py --device cuda --batches 1,32,256 ;;
    g2-anatomy) run g2-anatomy-8192 $PY benchmarks/gpu_g2_anatomy.py --out "$RES" --max-num-batched-tokens 8192 ;;
    g2-anatomy-1024) run g2-anatomy-1024 $PY benchmarks/gpu_g2_anatomy.py --out "$RES" --max-num-batched-tokens 1024 ;;
    moe-test) run moe-test $PY -m pytest -q -n 4 -p no:cacheprovider -rf tests/gpu/test_fused_moe_gpu.py ;;
    profile-g2) run profile-g2 $PY benchmarks/gpu_step_profile.py --out "$RES" --model llama-3.1-8b --batches 192 --ctx 1536 --engine --temperature 0.6 ;;
    greedy-new) run greedy-new $PY -m pytest -q -n 3 -p no:cacheprovider -rf tests/gpu/test_engine_gpu.py -k "moe or mixtral or olmoe or longrope or gpt_oss" ;;
    sinks) run sinks $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_triton_gpu.py -k sinks ;;
    structured-profile) run structured-profile $PY benchmarks/structured_output.py --device cuda --model .gpu-models/smollm2-135m --load-format dummy --dtype bfloat16 --rounds 3 --batch 8 32 64 --profile ;;
    sampler) run sampler-test $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_sampling_gpu.py
             run sampler-conformance $PY -m hallm.entrypoints.cli conformance --device cuda --require-device \
               --report "$RES/sampler-conformance-cuda.json" -- -k temperature_sample
             run sampler $PY benchmarks/gpu_sampler.py ;;
    g2-decode-gemm) run g2-anatomy-decode-gemm $PY benchmarks/gpu_g2_anatomy.py --out "$RES" --max-num-batched-tokens 8192 --variant decode-gemm ;;
    g2-anatomy-ab) run g2-anatomy-torch-sampler $PY benchmarks/gpu_g2_anatomy.py --out "$RES" --max-num-batched-tokens 8192 --variant no-temperature-sample ;;
    step-budget-host) run step-budget-host $PY benchmarks/gpu_step_budget.py --out "$RES" --model qwen2.5-0.5b --budgets 2048 --num-iters 1 --host-profile ;;
    step-budget) run step-budget $PY benchmarks/gpu_step_budget.py --out "$RES" --model qwen2.5-0.5b --budgets 2048,8192,16384 ;;
    structured-masks) run structured-masks $PY benchmarks/structured_masks.py --tokenizer .gpu-models/smollm2-135m --batch 1 8 32 64 ;;
    structured) run structured $PY benchmarks/structured_output.py --device cuda --model .gpu-models/smollm2-135m --load-format dummy --dtype bfloat16 --rounds 3 ;;
    kv-ttft) $PY -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from benchmarks.gpu_common import write_model_dir; write_model_dir('llama-3.1-8b', Path('/tmp/hallm-llama8b'))"
             run kv-ttft $PY benchmarks/kv_connector_ttft.py --device cuda --model /tmp/hallm-llama8b --load-format dummy --dtype bfloat16 --prefix-len 4096 --repeats 3 --enforce-eager ;;
    mp-1gpu-greedy) run mp-1gpu-greedy $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_tp_gpu.py -k one_rank ;;
    served-parse-ab) for v in offloaded-parse shipped; do
                       run served-qwen-$v $PY benchmarks/gpu_served.py --out "$RES" --model qwen2.5-0.5b --num-prompts 1000 --input-len 1024 --output-len 128 --concurrency-1-prompts 8 --num-iters 3 --timeout 240 --timeline --server-variant $v
                     done ;;
    mixed-graphs-ab) for v in decode-graphs shipped; do
                       run served-qwen-$v $PY benchmarks/gpu_served.py --out "$RES" --model qwen2.5-0.5b --num-prompts 1000 --input-len 1024 --output-len 128 --concurrency-1-prompts 8 --num-iters 3 --timeout 240 --timeline --engine-variant $v
                     done ;;
    server-gc-ab) for v in interpreter-gc shipped; do
                    run served-qwen-$v $PY benchmarks/gpu_served.py --out "$RES" --model qwen2.5-0.5b --num-prompts 1000 --input-len 1024 --output-len 128 --concurrency-1-prompts 8 --num-iters 3 --timeout 240 --timeline --engine-variant $v
                  done ;;
    api-servers-ab) for n in 1 2; do
                      run served-qwen-api$n $PY benchmarks/gpu_served.py --out "$RES" --model qwen2.5-0.5b --num-prompts 1000 --input-len 1024 --output-len 128 --concurrency-1-prompts 8 --num-iters 3 --timeout 240 --timeline --api-server-count $n
                    done ;;
    served-qwen) run served-qwen $PY benchmarks/gpu_served.py --out "$RES" --model qwen2.5-0.5b --num-prompts 1000 --input-len 1024 --output-len 128 --concurrency-1-prompts 32 --num-iters 3 --timeout 240 --timeline --py-spy ;;
    mp-1gpu) run mp-1gpu-greedy $PY -m pytest -q -p no:cacheprovider -rf tests/gpu/test_tp_gpu.py -k one_rank
             run mp-1gpu-g1 $PY benchmarks/gpu_g1.py --out "$RES" --model qwen2.5-0.5b --systems hallm --num-iters 1 --distributed-executor-backend mp
             run uni-g1 $PY benchmarks/gpu_g1.py --out "$RES" --model qwen2.5-0.5b --systems hallm --num-iters 1 ;;
    moe-g1) run moe-g1 $PY benchmarks/gpu_g1.py --out "$RES" --model qwen3-30b-a3b --systems hallm --num-iters 1 ;;
    served) run served-qwen $PY benchmarks/gpu_served.py --out "$RES" --model qwen2.5-0.5b --num-prompts 256 --input-len 1024 --output-len 128 --concurrency-1-prompts 32 --num-iters 3 --timeout 240
            run served-llama $PY benchmarks/gpu_served.py --out "$RES" --model llama-3.1-8b --num-prompts 128 --input-len 1024 --output-len 128 --concurrency-1-prompts 16 --num-iters 2 --timeout 240 ;;
    kv) run kv $PY -m pytest -v -p no:cacheprovider -rf -o faulthandler_timeout=100 tests/gpu/test_kv_connectors_gpu.py
        run kv-conformance $PY -m hallm.entrypoints.cli conformance --device cuda --require-device \
          --report "$RES/kv-conformance-cuda.json" -- -k kv_connector ;;
    conformance) run conformance $PY -m hallm.entrypoints.cli conformance --device cuda --require-device --report "$RES/conformance-cuda.json" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
