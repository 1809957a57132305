"""Registered attention methods: one file per method; importing a file registers it.

Adding a method: a new file here with its config dataclass (a ``MethodConfig``; ``SparseConfig`` for block-sparse
methods), its attention function registered with ``patchattn.registry.register_method`` -- or, for a block-sparse
method, only its block selector, registered with ``_sparse.register_sparse_method(name, config=, select=, static=,
paper=, doc=)`` -- and, if it keeps anything between calls, a ``MethodState`` dataclass passed as ``state_cls=``;
then one import line below.  A method file never imports another: shared helpers live in ``_sparse`` (block-sparse
glue), ``_heads`` (head-level glue) and ``_shared``; artifacts are read through ``patchattn.artifacts``.
"""

from . import act, blocktopk, dense, duo, headscale, hip, hyper, moa, moh, power, s2, streaming
from . import agent, gna, softpag  # DiTs
from . import clear, radial  # DiTs: Radial Attention, CLEAR
from . import longlora, sinklora  # fine-tuning methods (recipes/)
from . import dma, landmark  # fine-tuning sparse methods (recipes/dma, recipes/landmark)
from . import composite  # LVLMs (EE-MLLM)
from . import var  # LVLMs: visual attention sink redistribution
from . import paint, vhr  # LVLMs: the generated token reads the image (last-row edits)
from . import selective, softplus  # fine-tuning methods: temperature (SSA), softplus + re-weighting (LSSAR)
from . import hybrid, lightning  # linear attention (Lightning Attention-2, MiniMax-01 hybrid; recipes/)
