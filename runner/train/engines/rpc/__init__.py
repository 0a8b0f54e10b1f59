"""launch=rpc: train a model split across processes with torch.distributed.rpc.

Two topologies, chosen with `launch.topology`:

- `pipeline` (pipeline.py): the model (an nn.Sequential) is cut into `launch.num_stages` stages,
  each owned by one worker; a trainer process drives forward passes through RRefs, runs
  `dist_autograd.backward` in a distributed autograd context and steps a DistributedOptimizer.
- `parameter_server` (parameter_server.py): one worker owns the model; several trainers run
  forward/backward through it, each in its own autograd context, and step the shared parameters
  through DistributedOptimizers whose local optimizers are serialised by a lock on the server.

Workers start through the same elastic agent as DDP mode and meet with `rpc.init_rpc` on the
MASTER_ADDR/MASTER_PORT the agent sets; snapshots use the same versioned, verified format.
"""
