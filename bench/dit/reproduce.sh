#!/usr/bin/env bash
# DiT methods at real shapes (CUDA GPU, H200): one attention call and one whole transformer forward per method,
# beside SDPA (and FlexAttention on the method's own tiles) in the same run. Random weights: speed does not depend
# on them. Needs diffusers for the forward rows.
#   bash bench/dit/reproduce.sh [step ...]      (repository root as cwd; no step: all, in this order)
# Steps (one CSV each, a .json beside it with the environment and command). A step that runs both modes times the
# whole forward at every shape it names: FLUX (4 double + 8 single blocks), Wan (4 blocks) and now HunyuanVideo
# (4 double + 8 single blocks; ~17 GiB peak unpatched, bench/dit/forward_memory.py). The times below predate the
# HunyuanVideo forward rows: gna, routing, local and radial_block now take roughly 25 s more per method (an estimate
# from Wan's measured forward: ~5 s per HunyuanVideo forward, timed 5 times; not measured).
#   gna        FLUX 1024² / 4K (128² and NATTEN's 256² grid), Wan 720p, HunyuanVideo 720p: dense, gna (defaults:
#              the GNA paper's FLUX preset scaled per axis), moh (forward only)                     ~5 min
#   gna_paper  HunyuanVideo 720p with the GNA paper's 3D setting (window 18x24x24, stride 16x8x8)    ~1 min
#   gna_flex   gna attention only, beside FlexAttention compiled on the same tiles                  ~2 min
#   routing    blocktopk (BiFormer routing: defaults, and density 0.1) and agent, same shapes       ~4 min
#   radial_wan radial with the released code's Wan setting (no dense band, decay 0.2, frame-0 sink), Wan 720p  ~1 min
#   drift      CPU is enough: output and 4-Euler-step latent drift vs dense (cosine, PSNR) of every DiT method on
#              random-weight FLUX / Wan transformers with 32x32 / 5x16x16 latent grids — drift, not quality   ~5 min
#   local      radial (defaults past its dense warm-up steps) and clear, video shapes and FLUX-4K     ~3 min
#   agent      agent attention only (AgentSD defaults), after the fix of its strided agents (design note 43)  ~0.5 min
#   radial_block  radial token-exact vs granularity=block (band rounded outward to whole blocks, design note 48),
#              paper defaults and the released Wan setting, blocks 64 and 128, Wan 720p and HunyuanVideo 720p:
#              attention (beside SDPA and Flex, listed/partial tiles per row) and forward            ~4 min
#   hunyuan_forward  only the HunyuanVideo 720p forward rows, one CSV: the methods of gna, routing and local plus
#              gna with the GNA paper's 3D setting (gna_paper's); fills the forward gap without re-running their
#              attention rows (not in the default list: gna, routing and local write these rows too)   ~6 min
#   gna_tile   gna token-exact vs granularity=tile (neighborhoods rounded outward to tiles), attention only, the
#              scaled defaults at every default shape and the GNA paper's 3D setting at HunyuanVideo 720p  ~2 min
set -euo pipefail
out=${OUT:-bench/dit}
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gna gna_paper gna_flex routing local radial_wan agent)
shapes=flux-1024,flux-4k,wan-720p,hunyuan-720p
for step in "${steps[@]}"; do
    echo "== $step ($(date -u +%H:%M:%S) UTC)"
    case $step in
    gna) python -m patchattn.bench.dit --shapes flux-1024,flux-4k,flux-4k-256,wan-720p,hunyuan-720p \
        --methods 'dense;gna;moh' --csv "$out/gna.csv" ;;
    gna_paper) python -m patchattn.bench.dit --shapes hunyuan-720p --modes attention \
        --methods 'gna@paper:{"window":[18,24,24],"stride":[16,8,8]}' --csv "$out/gna_paper.csv" ;;
    gna_flex) python -m patchattn.bench.dit --shapes $shapes,flux-4k-256 --modes attention --methods 'gna' \
        --csv "$out/gna_flex.csv" ;;
    routing) python -m patchattn.bench.dit --shapes $shapes \
        --methods 'blocktopk;blocktopk@d10:{"density":0.1};agent' --csv "$out/routing.csv" ;;
    local) python -m patchattn.bench.dit --shapes wan-720p,hunyuan-720p,flux-4k \
        --methods 'radial@steady:{"dense_first_steps":0};clear' --csv "$out/local.csv" ;;
    radial_wan) python -m patchattn.bench.dit --shapes wan-720p --csv "$out/radial_wan.csv" --methods \
        'radial@wan:{"dense_first_steps":0,"dense_band":0,"decay_factor":0.2,"first_frame_sink":true}' ;;
    hunyuan_forward) python -m patchattn.bench.dit --shapes hunyuan-720p --modes forward --csv "$out/hunyuan_forward.csv" \
        --methods 'dense;gna;gna@paper:{"window":[18,24,24],"stride":[16,8,8]};moh;blocktopk;blocktopk@d10:{"density":0.1};agent;radial@steady:{"dense_first_steps":0};clear' ;;
    agent) python -m patchattn.bench.dit --modes attention --methods agent --shapes $shapes --csv "$out/agent.csv" ;;
    radial_block)
        wan='"dense_first_steps":0,"dense_band":0,"decay_factor":0.2,"first_frame_sink":true'
        methods=""
        for block in 64 128; do
            for gran in token block; do
                methods+="radial@paper-$gran-$block:{\"dense_first_steps\":0,\"block\":$block,\"granularity\":\"$gran\"};"
                methods+="radial@wan-$gran-$block:{$wan,\"block\":$block,\"granularity\":\"$gran\"};"
            done
        done
        python -m patchattn.bench.dit --shapes ${RADIAL_SHAPES:-wan-720p,hunyuan-720p} --csv "$out/radial_block.csv" \
            --methods "${methods%;}" ${RADIAL_ARGS:-} ;;
    gna_tile) python -m patchattn.bench.dit --shapes $shapes --modes attention --csv "$out/gna_tile.csv" \
        --methods 'gna@token;gna@tile:{"granularity":"tile"}' \
        && python -m patchattn.bench.dit --shapes hunyuan-720p --modes attention --csv "$out/gna_tile_paper.csv" \
        --methods 'gna@paper-token:{"window":[18,24,24],"stride":[16,8,8]};gna@paper-tile:{"window":[18,24,24],"stride":[16,8,8],"granularity":"tile"}' ;;
    drift) python -m patchattn.bench.dit --shapes small-flux,small-wan --modes drift --layers 2 --device cpu --dtype float32 \
        --methods 'dense;gna;clear;radial@steady:{"dense_first_steps":0};blocktopk;agent;moh' --csv "$out/drift.csv" ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
