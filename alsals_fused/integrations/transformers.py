"""Hugging Face ``Trainer`` with ALSALS: ``ALSALSTrainer`` (imports transformers when imported).

    from alsals_fused.integrations.transformers import ALSALSTrainer
    trainer = ALSALSTrainer(model=model, args=args, train_dataset=ds,
                            alsals_kwargs={"variant": "alsals"})     # or optimizers=(ALSALS(...), None)
    trainer.train()

What it changes in ``Trainer``:
- ``create_optimizer``: ALSALS over Trainer's two weight-decay groups (``args.weight_decay``),
  ``buffers=model``, plus ``alsals_kwargs``.  ``args.learning_rate`` is not used (the line search
  picks the step size; ``init_step_size`` is the first one).
- ``create_scheduler``: ``EtaSchedule``, which only reports eta (so Trainer logs eta as
  ``learning_rate``) instead of the default linear schedule, which would write to the lr.  A
  ``learning_rate``, ``lr_scheduler_type``, ``lr_scheduler_kwargs`` or warmup set away from
  ``TrainingArguments``' defaults is not used, and says so in a warning (for the end of a run
  with a known length: ``ALSALSTrainer(..., cooldown=True)``, which passes Trainer's step
  budget as ``total_steps``, or ``alsals_kwargs={"total_steps": ...}``).
- ``training_step``: each micro-batch's forward/backward runs inside ``opt.micro_batch``, so when
  Trainer calls ``optimizer.step()`` (after ``gradient_accumulation_steps`` micro-batches and after
  its own ``max_grad_norm`` clipping of p.grad, which the search then uses), the line search
  evaluates every micro-batch of the window: each trial forward is Trainer's own ``training_step``
  on that micro-batch under no_grad with backward switched off, so its loss is scaled exactly as
  the gradient's was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import List, Optional

import torch
from transformers import Trainer, TrainingArguments

from ..optimizer import ALSALS
from .accelerate import unwrap


class EtaSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler that writes nothing and reports eta (``param_groups[i]['lr']``)."""

    def __init__(self, optimizer):   # no LRScheduler.__init__: it would write to the lr
        self.optimizer = optimizer
        self.last_epoch = 0
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self._last_lr = list(self.base_lrs)

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self.get_lr()

    def step(self, epoch=None):
        self.last_epoch += 1
        self._last_lr = self.get_lr()


# What Trainer's own optimizer and schedule read; ALSALS's line search sets the step size instead.
SCHEDULE_ARGUMENTS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio")


def unused_schedule_arguments(args: TrainingArguments) -> List[str]:
    """``name=value`` of each schedule argument set away from TrainingArguments' default (of
    those this transformers version has; an empty ``lr_scheduler_kwargs`` counts as its default)."""
    def plain(value):
        value = getattr(value, "value", value)           # SchedulerType -> its string
        return None if value == {} else value
    unused = []
    for field in dataclasses.fields(TrainingArguments):
        if field.name in SCHEDULE_ARGUMENTS:
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            value = plain(getattr(args, field.name, default))
            if value != plain(default):
                unused.append(f"{field.name}={value!r}")
    return unused


@contextlib.contextmanager
def _backward_off(accelerator):
    accelerator.backward = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del accelerator.backward


class ALSALSTrainer(Trainer):
    """``cooldown=True`` gives ALSALS Trainer's own step budget (``max_steps``, or the epochs'
    optimizer steps) as ``total_steps``, so the run ends with the cooldown."""

    def __init__(self, *args, alsals_kwargs: Optional[dict] = None, cooldown: bool = False, **kwargs):
        self.alsals_kwargs = dict(alsals_kwargs or {})
        if not isinstance(cooldown, bool):
            raise TypeError(f"ALSALSTrainer: cooldown={cooldown!r} is invalid; accepted: True or False")
        if cooldown and self.alsals_kwargs.get("total_steps") is not None:
            raise ValueError("ALSALSTrainer: cooldown=True sets total_steps from Trainer's step budget; "
                             "pass it or alsals_kwargs={'total_steps': ...}, not both")
        passed = kwargs.get("optimizers") or (None, None)
        if cooldown and getattr(getattr(passed[0], "hyper", None), "total_steps", None) is not None:
            raise ValueError("ALSALSTrainer: cooldown=True sets total_steps from Trainer's step budget, and "
                             "the optimizer passed in optimizers= has its own; pass one of them, not both")
        if cooldown and passed[1] is not None:
            raise ValueError("ALSALSTrainer: cooldown=True is ALSALS's own end-of-run schedule, set where "
                             "Trainer creates the schedule; pass optimizers=(optimizer, None)")
        self.cooldown = cooldown
        self._alsals_budget: Optional[int] = None       # Trainer's step budget, for cooldown=True
        self._alsals_window_step = None
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            kwargs = {"buffers": opt_model, **self.alsals_kwargs}
            self.optimizer = ALSALS([g for g in groups if g["params"]], **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            unused = unused_schedule_arguments(self.args)
            if unused:
                warnings.warn(f"ALSALSTrainer: the line search sets the step size, so {', '.join(unused)} "
                              "in TrainingArguments are not used (alsals_kwargs={'init_step_size': ...} sets the "
                              "first trial, and ALSALSTrainer(..., cooldown=True) gives the run a cooldown at "
                              "its end)", stacklevel=2)
            optimizer = optimizer if optimizer is not None else self.optimizer
            if self.cooldown:
                self._alsals_budget = int(num_training_steps)
                unwrap(optimizer).set_total_steps(self._alsals_budget)
            # Trainer infers lr_scheduler as LambdaLR (its optimizers= tuple) but holds any LRScheduler.
            self.lr_scheduler = EtaSchedule(optimizer)  # type: ignore[assignment]
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = unwrap(self.optimizer)
        if self._alsals_window_step != self.state.global_step:   # a new accumulation window
            opt.discard_window()                                   # (a skipped step leaves one open)
            self._alsals_window_step = self.state.global_step
            if self._alsals_budget is not None and opt.hyper.total_steps != self._alsals_budget:
                self._resume_with_this_budget(opt)
        trial = functools.partial(self._alsals_trial, model, dict(inputs), num_items_in_batch,
                                  self.current_gradient_accumulation_steps)
        with opt.micro_batch(trial) as mb:
            loss = super().training_step(model, inputs, num_items_in_batch)
            mb.loss = loss
        return loss

    def _resume_with_this_budget(self, opt: ALSALS) -> None:
        """A checkpoint loaded after create_scheduler brought its own run's budget: this run's
        wins unless that run's cooldown has begun (then it goes on, and says so)."""
        try:
            opt.set_total_steps(self._alsals_budget)
        except (RuntimeError, ValueError) as refused:
            warnings.warn(f"ALSALSTrainer(cooldown=True): the resumed run keeps the checkpoint's "
                          f"total_steps={opt.hyper.total_steps}, not this run's {self._alsals_budget}: "
                          f"{refused}", stacklevel=2)
            self._alsals_budget = opt.hyper.total_steps

    def _alsals_trial(self, model, inputs, num_items_in_batch, accumulation_steps):
        saved = self.current_gradient_accumulation_steps
        self.current_gradient_accumulation_steps = accumulation_steps
        try:
            with _backward_off(self.accelerator):
                return Trainer.training_step(self, model, dict(inputs), num_items_in_batch)
        finally:
            self.current_gradient_accumulation_steps = saved
