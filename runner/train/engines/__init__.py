"""How one optimizer step runs and how the model and optimizer are captured and restored, one
module per way of spreading a model over processes: ddp (replicas; one process: the plain model),
fsdp (sharded parameters), rpc (a model split over processes). The loop sees them through
runner.train.engine.Engine."""
