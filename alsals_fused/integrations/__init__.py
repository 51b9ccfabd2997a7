"""ALSALS where people train: gradients computed outside ``step()``, Lightning, HF Trainer, accelerate.

Importing this package imports none of those frameworks; each submodule imports its framework
when it is itself imported (``alsals_fused.integrations.lightning``, ``.transformers``,
``.accelerate``), and the Lightning closure is recognised without importing Lightning.

- ``_api``: what the optimizer offers code that runs backward itself (``opt.micro_batch``), and
  the checks that turn silent no-ops into errors (scheduler writes to ``lr``, gradients accumulated
  before a ``step(closure)``, unknown param-group keys, ``lr=``).
- ``lightning``: handles Lightning's automatic-optimization closure (it runs backward itself).
- ``transformers``: ``ALSALSTrainer``, a ``transformers.Trainer`` that runs the line search.
- ``accelerate``: ``micro_batch(accelerator, optimizer, trial)`` for ``accelerator.accumulate()``.
"""
