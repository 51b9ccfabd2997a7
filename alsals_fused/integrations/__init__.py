"""ALSALS where people train: the adapters for Lightning, the Hugging Face Trainer and accelerate.

Importing this package imports none of those frameworks; each submodule imports its framework
when it is itself imported (``alsals_fused.integrations.lightning``, ``.transformers``,
``.accelerate``), and the Lightning closure is recognised without importing Lightning
(``alsals_fused.frameworks``).  What the optimizer itself offers code that runs backward itself
(``opt.micro_batch``, the gradient windows) and the checks that turn silent no-ops into errors
are the core package's (``alsals_fused.user_gradients``); the adapters use its public methods.

- ``lightning``: handles Lightning's automatic-optimization closure (it runs backward itself).
- ``transformers``: ``ALSALSTrainer``, a ``transformers.Trainer`` that runs the line search.
- ``accelerate``: ``micro_batch(accelerator, optimizer, trial)`` for ``accelerator.accumulate()``.
"""
