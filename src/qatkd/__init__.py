"""qatkd: small quantized models by quantization-aware training and knowledge distillation.

Importing the package registers the built-in task families (`qatkd.tasks`), so a configuration
of any of them validates (`qatkd.config.load_config`) whichever module is imported first.
"""

from qatkd import tasks  # noqa: F401
