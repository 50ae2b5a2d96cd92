"""The language task family: a pretrained causal LM (SmolLM2-135M by default) distilled into a
weight-only low-bit student; perplexity and agreement with the teacher as metrics. Modules:
`source` (models), `data` (text), `task` (losses, metrics), `export` (packed weights), `config`
and `family`. Importing the package registers only the configuration; `qatkd.tasks.task_family`
loads the family when a run needs it."""

from qatkd.tasks.language import config  # noqa: F401  (registers the configuration)
