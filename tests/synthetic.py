"""Re-export of :mod:`geometry.testing` (the random-adapter generator now ships with the library).

New code imports ``geometry.testing`` directly; this module stays for importers not yet moved.
"""

from geometry.testing import LLAMA3_8B_SHAPES, random_adapter, random_factors, save_peft_folder

__all__ = ["LLAMA3_8B_SHAPES", "random_adapter", "random_factors", "save_peft_folder"]
