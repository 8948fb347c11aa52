"""Knowledge distillation: losses (``losses.py``), teacher/student feature capture (``distiller.py``),
student builders (``students.py``), the trainer (``trainer.py``, its checkpoints in ``checkpoint.py``) and the
recipe step (``distill.py``)."""
