"""Object detection: generated canvases of Fashion-MNIST items or YOLO folders (`data`), compact
FCOS-style detectors (`models`), focal / GIoU / centerness losses, dense-output KD and mAP
(`task`), parity (`parity`), configuration (`config`) and the family (`family`). Importing the
package registers only the configuration; `qatkd.tasks.task_family` loads the family when a run
needs it."""

from qatkd.tasks.detection import config  # noqa: F401  (registers the configuration)
