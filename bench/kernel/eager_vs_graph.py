# On a CUDA GPU, from the repository root: PYTHONPATH=. python3 bench/kernel/eager_vs_graph.py bench/kernel/eager_vs_graph.json [fwd]
"""fwd+bwd (or, with ``fwd``, the forward alone) at 16k on sparse random lists, ours and FlexAttention on the same
masks, timed three ways: `do_bench`
(what `patchattn bench kernel` reports: L2 flushed before every call, host and device both counted), a tight loop of
back-to-back calls (no flush), and CUDA-graph replays (no host work at all).  Where ours loses under do_bench but not
in graphs, the difference is host time per call, not GPU time."""
import json
import sys


from patchattn.bench.kernel import flex_block_mask, graph_ms, lists_at_density, loop_ms, time_ms
from patchattn.kernels import blocksparse as bs


def main(out_path, forward_only=False):
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.config.cache_size_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    T, blk, Hq, Hkv = 16384, 128, 32, 8
    for D in (128, 64):
        q, k, v = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=not forward_only)
                   for h in (Hq, Hkv, Hkv))
        d_out = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        for density in (0.1, 0.02):
            idx, cnt = lists_at_density(bs, Hkv, T, blk, density, "cuda")
            mask = flex_block_mask(idx, cnt, T, blk, Hq)
            impls = {
                "ours": lambda: bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk),
                "flex": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
            }
            if not forward_only:
                impls = {name: lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), d_out) for name, fn in impls.items()}
            for name, fn in impls.items():
                row = dict(D=D, T=T, density=density, impl=name, mode="fwd" if forward_only else "fwdbwd",
                           do_bench_ms=time_ms(fn), loop_ms=loop_ms(fn))
                try:
                    row["graph_ms"] = graph_ms(fn)
                except Exception as e:  # capture not possible for this implementation
                    row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(out_path, "w"),
              indent=1)


if __name__ == "__main__":
    main(sys.argv[1], forward_only=sys.argv[2:] == ["fwd"])
