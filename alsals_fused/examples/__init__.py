"""Examples that use the optimizer; not part of it: the demo (``python -m alsals_fused.demo``),
its byte-level GPT (``models``) and its offline text corpus (``data``)."""
