"""The DDP and FSDP engines are siblings over one shared step (runner.train.engines.base): neither
inherits the other's way of synchronising gradients or of writing its state."""

from __future__ import annotations

import pytest
import torch

from runner.train.collectives import Collectives
from runner.train.engines.base import DataParallelEngine
from runner.train.engines.ddp import DDPEngine
from runner.train.engines.fsdp import FSDPEngine


def test_ddp_and_fsdp_engines_are_siblings_that_add_only_what_differs():
    assert issubclass(DDPEngine, DataParallelEngine) and issubclass(FSDPEngine, DataParallelEngine)
    assert not issubclass(FSDPEngine, DDPEngine) and not issubclass(DDPEngine, FSDPEngine)
    assert DataParallelEngine.__abstractmethods__ == {"_no_sync", "state_dict", "_load_whole_model", "_load_whole"}
    assert not hasattr(FSDPEngine, "_wrap") and not hasattr(FSDPEngine, "ddp_options")  # nothing of DDP's
    assert (DDPEngine.lockstep_evaluation, FSDPEngine.lockstep_evaluation) == (False, True)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="abstract"):  # the shared part alone is no engine
        DataParallelEngine(
            model, torch.optim.SGD(model.parameters(), lr=0.1), None, None, torch.device("cpu"), Collectives(), "gloo"
        )
