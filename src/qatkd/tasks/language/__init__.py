"""The language task family: a pretrained causal LM (SmolLM2-135M by default) distilled into a
weight-only low-bit student; perplexity and agreement with the teacher as metrics."""

from qatkd.tasks.language import config  # noqa: F401  (registers the configuration)
from qatkd.tasks.language.data import load_eval_text, load_train_text, sliding_windows
from qatkd.tasks.language.family import LANGUAGE, LanguageFamily
from qatkd.tasks.language.source import SMOLLM2, load_pretrained, model_folder
from qatkd.tasks.language.task import CausalLM, LanguageTask, next_token_nll

__all__ = [
    "LANGUAGE",
    "SMOLLM2",
    "CausalLM",
    "LanguageFamily",
    "LanguageTask",
    "load_eval_text",
    "load_pretrained",
    "load_train_text",
    "model_folder",
    "next_token_nll",
    "sliding_windows",
]
