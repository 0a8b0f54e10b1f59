"""The floor of a torchrun launch: each worker joins a gloo process group and leaves.

python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/join_only.py
"""

import torch.distributed as dist

dist.init_process_group(backend="gloo")
dist.barrier()
dist.destroy_process_group()
