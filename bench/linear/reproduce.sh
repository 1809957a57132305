#!/usr/bin/env bash
# Issue 23 "Speed": lightning / landmark / dma / hybrid beside SDPA in the same run (CUDA GPU, H200; random weights
# and untrained initial method parameters: speed does not depend on them).
#   bash bench/linear/reproduce.sh [step ...]      (repository root as cwd; no step: all, in this order)
# Each step fits one 10-minute device call (estimates are conservative; a row that fails, e.g. out of memory, is a
# row with its error, the run goes on). Attention shapes: Llama-3-8B (32 q / 8 kv heads, head_dim 128, bf16, B=1).
#   kernel        Lightning Attention-2 kernel alone, forward and forward+backward, 4k..128k, vs SDPA (flash);
#                 the paper's README shape (B=4, 32 heads, no GQA: 17.7 ms vs FA2 162.9 ms at 32k); one decoded
#                 token from the recurrent state at contexts 4k..128k (flat) vs SDPA decode on a cache that long ~3 min
#   lightning     the lightning layer (hedgehog features: 256 per head; sum normalisation: 129 value columns;
#                 gate): prefill, fwd+bwd (training), decode continuing its kept state, 4k..32k, vs SDPA       ~3 min
#   lightning_long  the same at 64k, 128k                                                                 ~5 min
#   landmark      landmark layer prefill + decode, 4k..32k                                                    ~3 min
#   landmark_long landmark at 64k, 128k (retrieval in chunks of query blocks since note 58; before: [32, T, T/64]
#                 fp32 logits, 34 GB at 128k, and every rank's piece kept until the mix)                 ~5 min
#   dma           dma layer prefill + decode, 4k..32k                                                         ~3 min
#   dma_long      dma at 64k, 128k (key ranking O(T log T) since note 58; before: every pair of keys)      ~6 min
#   generate_32k  model.generate, 32-layer Llama-3-8B shape, 32k prompt, dynamic and static cache: dense (SDPA),
#                 hybrid, lightning; decode = differential over 128 steps, 2 repeats                     ~5 min
#   generate_128k_hybrid     128k, dynamic cache: dense and hybrid (MiniMax 7 lightning : 1 softmax); 256 steps
#                            (a 128k prefill varies by ~1 s between calls), 1 repeat                      ~5 min
#   generate_128k_lightning  128k, dynamic cache: dense and lightning                                    ~5 min
#   generate_128k_static     128k, static cache (no per-step copy of the cache): dense, hybrid, lightning ~6 min
# generate: bounded_cache refuses lightning/hybrid (they keep the cache to recognise it and to rebuild their state
# for another one), so the cache holds every key; the dynamic cache copies it at every step (torch.cat, for every
# method), the static one does not (design note 47). Static-compiled is not run for them: their step reads the host.
set -euo pipefail
out=${OUT:-bench/linear}
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernel lightning lightning_long landmark landmark_long dma dma_long \
    generate_32k generate_128k_hybrid generate_128k_lightning generate_128k_static)
short=4096,8192,16384,32768
long=65536,131072
gen() {  # gen LENGTH METHODS CACHES NEW_TOKENS REPEATS CSV
    python -m patchattn.cli bench generate --lengths "$1" --batch 1 --methods "$2" --caches "$3" \
        --new-tokens "$4" --repeats "$5" --csv "$6"
}
for step in "${steps[@]}"; do
    echo "== $step ($(date -u +%H:%M:%S) UTC)"
    case $step in
    kernel) python -m patchattn.bench.linear --modes kernel,kernel-bwd,paper,decode-kernel --methods lightning \
        --csv "$out/kernel.csv" ;;
    lightning) python -m patchattn.bench.linear --modes prefill,prefill-bwd,decode --methods lightning \
        --lengths $short --decode-lengths $short --csv "$out/lightning.csv" ;;
    lightning_long) python -m patchattn.bench.linear --modes prefill,prefill-bwd,decode --methods lightning \
        --lengths $long --decode-lengths $long --csv "$out/lightning_long.csv" ;;
    landmark) python -m patchattn.bench.linear --modes prefill,decode --methods landmark --lengths $short \
        --decode-lengths $short --csv "$out/landmark.csv" ;;
    landmark_long) python -m patchattn.bench.linear --modes prefill,decode --methods landmark --lengths $long \
        --decode-lengths $long --csv "$out/landmark_long.csv" ;;
    dma) python -m patchattn.bench.linear --modes prefill,decode --methods dma --lengths $short \
        --decode-lengths $short --csv "$out/dma.csv" ;;
    dma_long) python -m patchattn.bench.linear --modes prefill,decode --methods dma --lengths $long \
        --decode-lengths $long --csv "$out/dma_long.csv" ;;
    generate_32k) gen 32768 dense,hybrid,lightning dynamic,static 1,129 2 "$out/generate_32k.csv" ;;
    generate_128k_hybrid) gen 131072 dense,hybrid dynamic 1,257 1 "$out/generate_128k_hybrid.csv" ;;
    generate_128k_lightning) gen 131072 dense,lightning dynamic 1,257 1 "$out/generate_128k_lightning.csv" ;;
    generate_128k_static) gen 131072 dense,hybrid,lightning static 1,257 1 "$out/generate_128k_static.csv" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
