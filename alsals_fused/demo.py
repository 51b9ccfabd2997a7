"""``python -m alsals_fused.demo``: forwards to the demo in ``alsals_fused.examples.demo``.

The demo, its model and its data live in ``alsals_fused/examples/`` (apart from the optimizer);
this module keeps the README's quick-start command working.
"""
from .examples.demo import main

if __name__ == "__main__":
    main()
