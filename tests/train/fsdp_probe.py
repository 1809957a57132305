"""``accelerate launch ... tests/train/fsdp_probe.py PROBE_FILE <patchattn train arguments>``: runs ``patchattn train``
and, when training ends, records the logits of the trained model *as it is, sharded* (every process runs the probe,
as FSDP2's collectives require; the main process writes ``PROBE_FILE``), before the trainer gathers the shards.
The tests compare them with ``patchattn.load(None, adapter=...)`` in one process: an independent path (saved files,
peft's loader, the patch-state loader) against the model that trained."""

import sys

import torch
from safetensors.torch import save_file

from patchattn.train import cli, parallel

PROBE_SEED, PROBE_SHAPE = 1234, (2, 48)

probe_file = sys.argv.pop(1)
sharded = {}
shard_blocks, gather_trainable = parallel.shard_blocks, parallel.gather_trainable


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


def recording_shard_blocks(peft_model, base_model, mode):
    shard_blocks(peft_model, base_model, mode)
    sharded["model"] = peft_model


def probing_gather(named):
    model = sharded["model"]
    model.eval()
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if torch.distributed.get_rank() == 0:
        save_file({"ids": ids, "logits": logits.detach().cpu().contiguous()}, probe_file)
    return gather_trainable(named)


parallel.shard_blocks, parallel.gather_trainable = recording_shard_blocks, probing_gather
sys.exit(cli.main())
