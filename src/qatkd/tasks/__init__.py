"""Task families, each a registered `TaskFamily` (`qatkd.tasks.family`) that owns its data, models,
teachers, losses, metrics and export. The pipeline finds them by name with `task_family`; this
package registers the built-in families' configurations (the families load on first use)."""

from qatkd.tasks import classification, detection, language  # noqa: F401  (configurations)
from qatkd.tasks.family import FAMILIES, Source, TaskFamily, task_family

__all__ = ["FAMILIES", "Source", "TaskFamily", "task_family"]
