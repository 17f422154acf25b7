#!/usr/bin/env bash
# The command behind bench/results/serve-nano: nano served over HTTP on this 2-core CPU (server: 1 torch
# thread; the load generator runs beside it), greedy, 24 requests per rate, max_tokens 64.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=bench/results/serve-nano
rm -f "$out/results.jsonl"
run() {  # label, port, serve flags...
    label=$1 port=$2; shift 2
    OMP_NUM_THREADS=1 python tools/bench_serve.py --launch "python -m dspark.cli serve --model nano --port $port \
        --max-batch 8 --max-seq-len 512 --threads 1 $*" --url "http://127.0.0.1:$port" --label "$label" \
        --prompts "$out/prompts.txt" --num-prompts 24 --max-tokens 64 --request-rate 1 4 inf --out "$out"
}
run ar 8011 --method ar
run mtp-1 8012 --method mtp --num-draft-tokens 1
run dspark 8013 --method dspark --scheduler hardware
python tools/bench_serve.py --plot --out "$out"
