"""Tasks: what slimkit knows about each kind of model (how it is fed, measured and compared).

``task_of(model)`` answers for any model; ``set_task`` attaches a ``GenericTask`` with a
user's callbacks; ``register_task`` adds a kind; ``register_corpus`` adds a built-in data
set; ``DataSpec`` / ``read_source`` read a user's data (``sources.py``).
"""

from slimkit.tasks.base import (Corpus, EvalData, Task, corpus, corpus_names, register_corpus, register_task,
                                set_task, task_kinds, task_of)
from slimkit.tasks.causal_lm import CausalLMTask
from slimkit.tasks.classifier import ClassifierTask
from slimkit.tasks.encoder import EncoderTask
from slimkit.tasks.generic import GenericTask
from slimkit.tasks.image_classifier import ImageClassifierTask
from slimkit.tasks.sources import DataSpec, read_source

__all__ = ["CausalLMTask", "ClassifierTask", "Corpus", "DataSpec", "EncoderTask", "EvalData", "GenericTask",
           "ImageClassifierTask", "Task", "corpus", "corpus_names", "read_source", "register_corpus",
           "register_task", "set_task", "task_kinds", "task_of"]
