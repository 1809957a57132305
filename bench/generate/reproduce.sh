#!/usr/bin/env bash
# model.generate end to end (CUDA GPU, H200): Llama-3-8B shape (32 layers), random bf16 weights, each method beside
# SDPA: time to first token, decode ms/step (differential: generate with 1 and 25 new tokens, median of the
# repeats), peak memory, KV cache bytes; per cache kind: dynamic (default, eager), static-compiled (transformers
# compiles the decode step, mode reduce-overhead), bounded (patchattn.bounded_cache, eager: streaming, duo) and
# bounded-static-compiled (bounded_cache(model, static=True): fixed buffers, generate compiles the step; streaming).
#   bash bench/generate/reproduce.sh [step ...]      (repository root as cwd; no step: all, in this order)
# Steps (one CSV each, first line: environment and command; after each, generate.png is redrawn from every CSV):
#   b1_32k            B=1, 32k, dynamic + bounded (streaming, duo) + bounded-static-compiled (streaming)  ~4 min
#   b1_32k_compiled   B=1, 32k, static-compiled                                             ~6.5 min
#   b1_128k           B=1, 128k, dynamic + bounded (streaming, duo) + bounded-static-compiled (streaming) ~6 min
#   b1_128k_compiled  B=1, 128k, static-compiled (dense, hip, blocktopk)                     ~5 min
#                     (METHODS=dense, then METHODS=hip, ...: one method per call on an H100, each to
#                     generate_b1_128k_compiled_<method>.csv)
#   b1_128k_compiled2 B=1, 128k, static-compiled (streaming, duo)                            ~3.5 min
#   b8_32k            B=8, 32k, dynamic + bounded (streaming, duo)                           ~6 min
#   b8_32k_compiled   B=8, 32k, static-compiled (dense, hip, blocktopk)                      ~6 min
#   b1_512k           B=1, 512k, streaming dynamic vs bounded (eager, static-compiled), duo bounded   ~7 min
#   profile           one eager decode step per method after a 32k prefill (profile_step.json/.md)   ~1.5 min
# Batch 8 at 128k is left out: SDPA's KV cache alone is 8 x 16 GiB + 15 GiB of weights > 141 GB (the tool
# records such a configuration as "skipped" without running it).
# At 128k the decode step is the differential of generate with 1 and 257 new tokens (--new-tokens 1,257): a 128k
# prefill varies by about a second between calls, which made (generate 25 - generate 1) / 24 meaningless (negative).
# Bounded rows compare their tokens with the dynamic rows of the same command; the compiled steps take
# tokens_equal_dynamic from the matching dynamic CSV (--reference: per-sequence token hashes), which assumes the
# kernels give the same tokens from one process to the next.
#
# Expected times assume the first H200 run's figures (bench/generate/RESULTS.md, bench/methods/speed.csv): a 32-layer
# prefill of 1.4 s (SDPA) / ~1.1 s (sparse) at 32k, 11.6 s / 4-6.5 s at 128k, ~11 s / ~8.5 s at 32k x 8; eager
# decode steps ~85 ms, compiled ~30 ms; about 60 s of torch.compile per method (a guess: not measured yet at 32
# layers). Per configuration: 1 + 2 x repeats generate calls (prefills) and (repeats + 1) x 24 decode steps.
# At 512k: streaming's prefill ~16.5 s (the MLPs), duo's ~58 s (its retrieval heads stay dense), hence 1 repeat;
# rows are appended as they come, so a step cut short keeps what it measured.
set -euo pipefail
out=${OUT:-bench/generate}
mkdir -p "$out"
methods=dense,hip,blocktopk,streaming,duo
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(b1_32k b1_32k_compiled b1_128k b1_128k_compiled b1_128k_compiled2 b8_32k
                                 b8_32k_compiled b1_512k profile)
csvs=(generate_b1_32k generate_b1_32k_compiled generate_b1_128k generate_b1_128k_compiled
      generate_b1_128k_compiled2 generate_b8_32k generate_b8_32k_compiled generate_b1_512k)

bench() {  # bench NAME EXPECTED_MINUTES ARGS...: one command, one CSV, then the plot of every CSV so far
    local name=$1 minutes=$2
    shift 2
    echo "== $name: expected ~$minutes min on an H200 ($(date -u +%H:%M:%S) UTC)"
    patchattn bench generate --layers 32 --new-tokens 1,25 --csv "$out/$name.csv" "$@"
    local present=()
    for csv in "${csvs[@]}"; do [ -f "$out/$csv.csv" ] && present+=("$out/$csv.csv"); done
    python -m patchattn.bench.generate_plot "${present[@]}" --out "$out/generate.png"
}

reference() {  # --reference FILE when that dynamic CSV exists
    [ -f "$out/$1.csv" ] && echo "--reference $out/$1.csv" || true
}

for step in "${steps[@]}"; do
    case $step in
    b1_32k) bench generate_b1_32k 4 --lengths 32768 --batch 1 --methods $methods \
        --caches dynamic,bounded=streaming+duo,bounded-static-compiled=streaming --repeats 3 ;;
    b1_32k_compiled) bench generate_b1_32k_compiled 6.5 --lengths 32768 --batch 1 --methods $methods \
        --caches static-compiled --repeats 3 $(reference generate_b1_32k) ;;
    b1_128k) bench generate_b1_128k 6 --lengths 131072 --batch 1 --methods $methods \
        --caches dynamic,bounded=streaming+duo,bounded-static-compiled=streaming --repeats 2 --new-tokens 1,257 ;;
    b1_128k_compiled) bench "generate_b1_128k_compiled${METHODS:+_${METHODS//,/_}}" 5 --lengths 131072 --batch 1 \
        --methods "${METHODS:-dense,hip,blocktopk}" \
        --caches static-compiled --repeats 2 $(reference generate_b1_128k) --new-tokens 1,257 ;;
    b1_128k_compiled2) bench generate_b1_128k_compiled2 3.5 --lengths 131072 --batch 1 --methods streaming,duo \
        --caches static-compiled --repeats 2 $(reference generate_b1_128k) --new-tokens 1,257 ;;
    b8_32k) bench generate_b8_32k 6 --lengths 32768 --batch 8 --methods $methods \
        --caches dynamic,bounded=streaming+duo --repeats 2 ;;
    b8_32k_compiled) bench generate_b8_32k_compiled 6 --lengths 32768 --batch 8 --methods dense,hip,blocktopk \
        --caches static-compiled --repeats 2 $(reference generate_b8_32k) ;;
    b1_512k) bench generate_b1_512k 7 --lengths 524288 --batch 1 --methods streaming,duo \
        --caches dynamic=streaming,bounded,bounded-static-compiled=streaming --repeats 1 ;;
    profile)
        echo "== profile: expected ~1.5 min on an H200"
        patchattn bench generate --layers 32 --lengths 32768 --batch 1 --methods $methods \
            --profile-step "$out/profile_step" --profile-steps 10 ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
