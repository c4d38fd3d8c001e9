"""Trainers; `recbole_reason.utils.get_trainer` finds class `XTrainer` in module `x_trainer`."""

from recbole_reason.trainer.base import PostTrainingTrainer, ReasonTrainer

__all__ = ["ReasonTrainer", "PostTrainingTrainer"]
