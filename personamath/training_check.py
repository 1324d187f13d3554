"""Whether a training run can change the model, and how far it did.

Before training, train.py asks the Trainer how many optimizer steps the run will make and how many of
them have a learning rate above 0 (plan_steps): a run with none would save the base model unchanged. After
training, the saved weights are compared with the base model's, tensor by tensor (weight_change), for
training_summary.json.
"""
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers.optimization import GreedyLR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


@dataclass
class StepPlan:
    """The optimizer steps a run will make, in the Trainer's own arithmetic."""
    examples: int
    global_batch: int  # per-device batch x accumulation steps x data-parallel ranks
    per_device_batch: int
    accumulation_steps: int
    num_train_epochs: float
    max_steps: int  # --max_steps; -1 when the epochs decide
    optimizer_steps: int
    steps_above_zero_lr: int
    warmup_steps: int
    learning_rate: float
    lr_scheduler_type: str

    def describe(self) -> str:
        ranks = self.global_batch // (self.per_device_batch * self.accumulation_steps)
        length = f"max steps {self.max_steps}" if self.max_steps > 0 else f"epochs {self.num_train_epochs:g}"
        return (f"rows {self.examples}, global batch {self.global_batch} (per device {self.per_device_batch} x "
                f"accumulation steps {self.accumulation_steps} x data-parallel ranks {ranks}), {length}: optimizer "
                f"steps {self.optimizer_steps}, of them at a learning rate above 0: {self.steps_above_zero_lr} "
                f"(warmup steps {self.warmup_steps}, learning rate {self.learning_rate:g}, {self.lr_scheduler_type} "
                f"schedule)")


def plan_steps(trainer: transformers.Trainer) -> StepPlan:
    """The run's optimizer steps as trainer.train() will count them (its dataloader, on this rank, and its
    set_initial_training_values), and their learning rates from the scheduler it will build."""
    args = trainer.args
    _, _, examples, _, global_batch, _, max_steps = trainer.set_initial_training_values(
        args, trainer.get_train_dataloader())
    return StepPlan(examples=examples, global_batch=global_batch, per_device_batch=args.per_device_train_batch_size,
                    accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=args.num_train_epochs,
                    max_steps=args.max_steps, optimizer_steps=max_steps,
                    steps_above_zero_lr=steps_above_zero_lr(args, max_steps),
                    warmup_steps=args.get_warmup_steps(max_steps), learning_rate=args.learning_rate,
                    lr_scheduler_type=transformers.SchedulerType(args.lr_scheduler_type).value)


def steps_above_zero_lr(args: transformers.TrainingArguments, max_steps: int) -> int:
    """How many of `max_steps` optimizer steps run at a learning rate above 0: the Trainer's scheduler
    (Trainer.create_scheduler's call) stepped over a stand-in optimizer, each step taken at the rate the
    scheduler sets before it, as in training."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = transformers.get_scheduler(args.lr_scheduler_type, optimizer,
                                           num_warmup_steps=args.get_warmup_steps(max_steps),
                                           num_training_steps=max_steps,
                                           scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    above = 0
    for _ in range(max_steps):
        above += optimizer.param_groups[0]["lr"] > 0
        optimizer.step()
        # The Trainer steps these on evaluations only, not after each optimizer step.
        if not isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)):
            scheduler.step()
    return above


def safetensors_files(folder: Path) -> list[Path]:
    """A saved model's weight files: the shards its index names, or its one model.safetensors."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / SAFE_WEIGHTS_NAME
    return [single] if single.is_file() else []


def weight_change(base, trained) -> dict:
    """How far the weights in folder `trained` are from those in `base`, over the tensors both hold (by
    name, in float32), read one tensor at a time so that memory holds two tensors, not two models."""
    base, trained = Path(base), Path(trained)
    base_files = safetensors_files(base) if base.is_dir() else []
    if not base_files:
        return {"base": str(base), "compared": False,
                "why": f"{base} is not a local folder of safetensors weights (a hub name is not looked up)"}
    compared = changed = 0
    max_abs_change = squared_change = squared_base = 0.0
    with ExitStack() as files:
        trained_weights = {}  # tensor name -> the open file in `trained` that holds it
        for path in safetensors_files(trained):
            weights = files.enter_context(safe_open(path, "pt"))
            trained_weights.update(dict.fromkeys(weights.keys(), weights))
        for path in base_files:
            base_weights = files.enter_context(safe_open(path, "pt"))
            for name in base_weights.keys():
                if name not in trained_weights:
                    continue
                before = base_weights.get_tensor(name).float()
                change = trained_weights[name].get_tensor(name).float() - before
                compared += 1
                changed += bool(change.any())
                max_abs_change = max(max_abs_change, change.abs().max().item())
                # Norms in float64: in float32 a large tensor's sum of squares is off by about 1e-4.
                squared_change += torch.linalg.vector_norm(change, dtype=torch.float64).item() ** 2
                squared_base += torch.linalg.vector_norm(before, dtype=torch.float64).item() ** 2
    if not compared:
        return {"base": str(base), "compared": False, "why": f"{trained} holds no tensor named as one in {base}"}
    return {"base": str(base), "compared": True, "tensors_compared": compared, "tensors_changed": changed,
            "max_abs_change": max_abs_change,
            "relative_change": math.sqrt(squared_change / squared_base),
            "equals_base": changed == 0}


def training_summary(plan: StepPlan, state: transformers.TrainerState, base, trained) -> dict:
    """What training did: the rows, the steps made and planned, the loss curve, how far the weights moved."""
    curve = [[entry["step"], entry["loss"]] for entry in state.log_history if "loss" in entry]
    return {"examples": plan.examples, "optimizer_steps": state.global_step,
            "planned_optimizer_steps": plan.optimizer_steps, "planned_steps_above_zero_lr": plan.steps_above_zero_lr,
            "loss_first": curve[0][1] if curve else None, "loss_last": curve[-1][1] if curve else None,
            "loss_curve": curve, "weights": weight_change(base, trained)}


def summary_line(summary: dict) -> str:
    """training_summary.json in one plain sentence, for the end of the log."""
    steps = f"{summary['optimizer_steps']} optimizer step" + "s" * (summary["optimizer_steps"] != 1)
    loss = (f"loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}" if summary["loss_curve"]
            else "no loss logged")
    weights = summary["weights"]
    if not weights["compared"]:
        return f"training made {steps}; {loss}; the weights were not compared: {weights['why']}"
    if weights["equals_base"]:
        return (f"the trained model EQUALS the base model: no weight changed in {steps} "
                f"({summary['planned_steps_above_zero_lr']} planned at a learning rate above 0); {loss}")
    return (f"training moved the weights by at most {weights['max_abs_change']:.3g} (relative "
            f"{weights['relative_change']:.3g}) over {steps}; {loss}")
