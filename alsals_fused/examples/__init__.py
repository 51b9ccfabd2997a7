"""Examples that use the optimizer; not part of it: the demo (``python -m alsals_fused.demo``),
its byte-level GPT (``models``) and its offline text corpus (``data``), and DDP/FSDP2 training
with a distributed checkpoint (``distributed``: ``torchrun --nproc-per-node 2 -m
alsals_fused.examples.distributed``)."""
