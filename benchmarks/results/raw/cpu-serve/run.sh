#!/bin/bash
cd /work/main
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HALLM_CACHE_DIR=/work/main/.cache/hallm
PORT=18202
.venv/bin/hallm serve --device cpu --max-model-len 2048 --port $PORT --disable-uvicorn-access-log > /tmp/cpu-serve/server3.log 2>&1 &
SPID=$!
for i in $(seq 1 600); do sleep 1; curl -s -o /dev/null localhost:$PORT/health 2>/dev/null && break; done
echo "server up after ${i}s" > /tmp/cpu-serve/progress.txt
(while true; do echo "$(date +%T) $(cut -d' ' -f1 /proc/loadavg)" >> /tmp/cpu-serve/loadavg.txt; sleep 10; done) &
LPID=$!
for spec in "1 16" "8 32" "32 64"; do
  set -- $spec
  echo "c=$1 n=$2 start $(date +%T) load: $(cat /proc/loadavg)" >> /tmp/cpu-serve/progress.txt
  .venv/bin/hallm bench serve --base-url http://127.0.0.1:$PORT/v1 --max-concurrency $1 --num-prompts $2 \
     --input-len 128 --output-len 64 --vocab-size 49152 --seed $1 --output-json /tmp/cpu-serve/quiet-c$1.json > /tmp/cpu-serve/quiet-c$1.txt 2>&1
  echo "c=$1 done $(date +%T) load: $(cat /proc/loadavg)" >> /tmp/cpu-serve/progress.txt
done
kill $LPID
kill -TERM $SPID; wait $SPID; echo "server exit $?" >> /tmp/cpu-serve/progress.txt
