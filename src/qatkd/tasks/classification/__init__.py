"""Image classification: datasets (`data`), models (`models`), task loss and metrics (`task`),
parity (`parity`), configuration (`config`) and the family (`family`). Importing the package
registers only the configuration; `qatkd.tasks.task_family` loads the family when a run needs it.
"""

from qatkd.tasks.classification import config  # noqa: F401  (registers the configuration)
