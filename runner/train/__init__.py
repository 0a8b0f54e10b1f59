"""Training inside the workers: the one loop (loop.py), the engines that run its steps (ddp.py,
rpc/), what connects the ranks (collectives.py), and the pieces a resume relies on (sampler.py,
rng.py, stop.py, metrics.py). worker.py and session.py wire them together."""
