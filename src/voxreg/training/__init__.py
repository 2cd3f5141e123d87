"""Training: the shared engine (:mod:`voxreg.training.engine`), pairwise registration training
(:mod:`voxreg.training.trainer`) and template training (:mod:`voxreg.training.template`)."""

from voxreg.training import engine
from voxreg.training.template import TemplateTrainer, train_template
from voxreg.training.trainer import Trainer, train

__all__ = ["TemplateTrainer", "Trainer", "engine", "train", "train_template"]
