"""Checks of the objects the config names: every `_target_` imports, and its constructor takes the keys given.

The model is built on the meta device (no memory), so a bad keyword or a model unfit for the chosen
launch is caught here. The optimizer and scheduler are checked by signature and value, not built:
building any torch optimizer imports torch._dynamo, ~1 s of startup the workers pay anyway.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from runner.config import Interval, LaunchMode, Strategy, Topology
from runner.errors import UserError

log = logging.getLogger("runner.driver.checks")

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
BUILT_GROUPS = ("dataset", "task", "model", "optimizer", "scheduler")
# torch optimizers say "Invalid learning rate: -1"; map the phrase to the config key.
TORCH_PHRASES = {
    "learning rate": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "beta": "betas",
    "epsilon": "eps",
    "dampening": "dampening",
    "step_size": "step_size",
}
NON_NEGATIVE_OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay", "eps", "dampening", "alpha")


def check_objects(cfg: DictConfig, choices: dict[str, str], overrides: tuple = ()) -> int:
    """Import every _target_ and dry-build the model on the meta device; check the other constructors'
    arguments. Returns the bytes of the model's parameters and buffers (for the disk-space check)."""
    where = {group: source(group, choices, overrides) for group in BUILT_GROUPS}
    check_targets(cfg, where)
    if cfg.get("logger"):
        check_loggers(cfg.logger, source("logger", choices, overrides))
    check_dataset_arguments(cfg.dataset, where["dataset"])
    model = build_model_on_meta(cfg.model, where["model"])
    check_pipeline_model(cfg, model)
    check_fsdp_model(cfg, model)
    params = list(model.parameters())
    if not params:
        raise UserError(
            "model._target_", cfg.model._target_, "the model has no trainable parameters", "a model with parameters"
        )
    check_optimizer(cfg.optimizer, params, where["optimizer"])
    if cfg.get("scheduler"):
        check_scheduler(cfg.scheduler, where["scheduler"])
    check_task(cfg.task, where["task"])
    return sum(tensor.numel() * tensor.element_size() for tensor in [*params, *model.buffers()])


def source(group: str, choices: dict[str, str], overrides: tuple) -> str:
    """Where a group's keys came from, for the message: its YAML file, and the command line if it changed one."""
    if any(o.lstrip("+~").startswith(f"{group}.") for o in overrides):
        return f"conf/{group}/{choices.get(group)}.yaml and the command line"
    return f"conf/{group}/{choices[group]}.yaml" if group in choices else f"the '{group}' config"


def check_targets(cfg: DictConfig, where: dict[str, str]) -> None:
    for group in BUILT_GROUPS:
        node = cfg.get(group)
        if node or group != "scheduler":
            locate_target(group, node, where[group])


def locate_target(key: str, node: DictConfig, where: str) -> Any:
    target = node.get("_target_")
    try:
        return get_object(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError from get_object
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise UserError(
            f"{key}._target_",
            target,
            f"cannot be imported (set in {where}): {reason}",
            "a dotted path to an importable class or function, e.g. torch.nn.Linear",
            "fix the spelling, or install the package that provides it",
        ) from None


def build_error(key: str, node: DictConfig, err: Exception, where: str) -> UserError:
    """A constructor's complaint as a UserError naming the config key it is about, where one can be told."""
    cause = err.__cause__ or err
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    bad_key = key
    match = re.search(r"unexpected keyword argument '(\w+)'", text)
    if match:
        bad_key = f"{key}.{match.group(1)}"
    else:
        for phrase, name in TORCH_PHRASES.items():
            if phrase in text and name in node:
                bad_key = f"{key}.{name}"
                break
    value = node.get(bad_key.rsplit(".", 1)[-1]) if bad_key != key else node.get("_target_")
    return UserError(
        bad_key,
        value,
        f"{node.get('_target_')} rejects it (from {where}): {type(cause).__name__}: {text}",
        "the arguments its constructor accepts",
        f"change or remove {bad_key}",
    )


def arguments(node: DictConfig) -> dict[str, Any]:
    """A group's keyword arguments: its keys without Hydra's own."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in HYDRA_KEYS}


def bind(key: str, node: DictConfig, where: str, target: Any, args: list, kwargs: dict) -> None:
    """The constructor accepts these arguments (an unknown or missing one is a user mistake)."""
    try:
        inspect.signature(target).bind(*args, **kwargs)
    except TypeError as err:
        raise build_error(key, node, err, where) from None
    except ValueError:
        pass  # no introspectable signature


def check_dataset_arguments(dataset: DictConfig, where: str) -> None:
    kwargs = arguments(dataset)
    bind("dataset", dataset, where, get_object(str(dataset._target_)), [], kwargs)
    size = kwargs.get("size")
    if isinstance(size, int) and size < 1:
        raise UserError("dataset.size", size, "a dataset needs at least one sample", "an integer >= 1")


def build_model_on_meta(node: DictConfig, where: str) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            model = instantiate(node)
    except Exception as err:
        raise build_error("model", node, err, where) from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(
            "model._target_",
            node._target_,
            f"builds a {type(model).__name__}, not a torch.nn.Module",
            "a class or function returning torch.nn.Module",
        )
    return model


def check_pipeline_model(cfg: DictConfig, model: torch.nn.Module) -> None:
    """launch=rpc with a pipeline cuts an nn.Sequential into launch.num_stages stages."""
    if cfg.launch.mode != LaunchMode.rpc or cfg.launch.topology != Topology.pipeline:
        return
    stages = cfg.launch.num_stages
    if isinstance(model, torch.nn.Sequential) and len(model) >= stages:
        return
    layers = f" with {len(model)} layers" if isinstance(model, torch.nn.Sequential) else ""
    raise UserError(
        "launch.num_stages",
        stages,
        f"a pipeline cuts an nn.Sequential into stages; {cfg.model._target_} builds {type(model).__name__}{layers}",
        "a model that is an nn.Sequential with at least num_stages layers (e.g. model=mlp)",
        "use model=mlp, or fewer stages",
    )


def check_fsdp_model(cfg: DictConfig, model: torch.nn.Module) -> None:
    """trainer.strategy=fsdp: meta_init can initialise the model, and trainer.fsdp.shard names its modules."""
    fsdp = cfg.trainer.fsdp
    if cfg.trainer.strategy != Strategy.fsdp:
        return
    if fsdp.meta_init:
        check_meta_init(model, str(cfg.model._target_))
    if fsdp.shard:
        from runner.train.engines.fsdp import shard_blocks

        if not shard_blocks(model, str(fsdp.shard)):
            kinds = sorted(
                {type(m).__name__ for m in model.modules() if m is not model and any(True for _ in m.parameters())}
            )
            raise UserError(
                "trainer.fsdp.shard",
                fsdp.shard,
                f"names no module of {cfg.model._target_}",
                f"a class of its modules: {', '.join(kinds[:8])}",
                "e.g. trainer.fsdp.shard=null (each top-level child)",
            )


def check_meta_init(model: torch.nn.Module, target: str) -> None:
    """trainer.fsdp.meta_init fills the model's memory with `init_weights()` or each module's
    `reset_parameters()`: anything neither reaches would train from whatever the memory held."""
    if callable(getattr(model, "init_weights", None)):
        return
    uncovered = [
        f"{prefix + '.' if prefix else ''}{name}"
        for prefix, module in model.named_modules()
        if not callable(getattr(module, "reset_parameters", None))
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    ]
    if uncovered:
        shown = ", ".join(uncovered[:4]) + (f" and {len(uncovered) - 4} more" if len(uncovered) > 4 else "")
        raise UserError(
            "trainer.fsdp.meta_init",
            True,
            f"{target} has no init_weights(), and {shown} belong to modules "
            "without reset_parameters(): after a build on the meta device nothing would initialise them",
            "a model with init_weights() (called after sharding), or whose every parameter and buffer is "
            "in a module with reset_parameters()",
            "add an init_weights() method to the model, or drop "
            "trainer.fsdp.meta_init (the model is then built whole and sharded)",
        )
    log.warning(
        "trainer.fsdp.meta_init: %s has no init_weights(), so each module's reset_parameters() initialises it; "
        "an initialisation its constructor applies (a custom std, tied weights) is not replayed",
        target,
    )


def check_optimizer(node: DictConfig, params: list, where: str) -> None:
    """The optimizer's arguments by signature and value (negative rates, betas outside [0, 1))."""
    optimizer_cls = get_object(str(node._target_))
    kwargs = arguments(node)
    bind("optimizer", node, where, optimizer_cls, [params], kwargs)
    for name in NON_NEGATIVE_OPTIMIZER_KEYS:
        value = kwargs.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(
                f"optimizer.{name}",
                value,
                f"{optimizer_cls.__name__} rejects a negative {name} (from {where})",
                "a value >= 0",
                f"e.g. optimizer.{name}=0.01" if name == "lr" else f"e.g. optimizer.{name}=0",
            )
    betas = kwargs.get("betas")
    pair = isinstance(betas, (list, tuple)) and len(betas) == 2
    if betas is not None and not (pair and all(0 <= b < 1 for b in betas)):
        raise UserError(
            "optimizer.betas",
            betas,
            f"must be two numbers in [0, 1) (from {where})",
            "[beta1, beta2], e.g. [0.9, 0.999]",
        )


def check_scheduler(node: DictConfig, where: str) -> None:
    """scheduler.interval is a word the loop knows; the scheduler's own arguments by signature."""
    from runner.train.schedules import RUNNER_KEYS

    interval = str(node.get("interval", Interval.epoch))
    if interval not in Interval._value2member_map_:
        raise UserError(
            "scheduler.interval",
            interval,
            "is not a scheduler interval",
            Interval.words(),
            "e.g. scheduler.interval=step",
        )
    kwargs = {k: v for k, v in arguments(node).items() if k not in RUNNER_KEYS}
    bind("scheduler", node, where, get_object(str(node._target_)), [object()], kwargs)


def check_task(node: DictConfig, where: str) -> None:
    bind("task", node, where, get_object(str(node._target_)), [], arguments(node))
    try:
        instantiate(node)
    except Exception as err:
        raise build_error("task", node, err, where) from None


def check_loggers(node: DictConfig, where: str) -> None:
    """Every logger's class imports and its package is installed (else: the pip install to run)."""
    from runner.loggers import REQUIREMENTS

    many = str(node.get("_target_")) == "runner.loggers.ManyLoggers"
    nodes = list(node.get("loggers") or []) if many else [node]
    for i, item in enumerate(nodes):
        key = "logger" if item is node else f"logger.loggers[{i}]"
        locate_target(key, item, where)
        module, extra = REQUIREMENTS.get(str(item.get("_target_")), (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            name = str(item._target_).rsplit(".", 1)[-1]
            raise UserError(
                f"{key}._target_",
                item._target_,
                f"{name} needs the {module} package, which is not installed",
                f"logger=none, or {module} installed",
                f'pip install "hydra-torch-runner[{extra}]", or drop the logger',
            )
