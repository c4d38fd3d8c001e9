"""ReaRec has one training stage (ERL or PRL); its trainer only tells the model the epoch, for RCL's warm-up."""

from recbole_reason.trainer.base import ReasonTrainer


class ReaRecTrainer(ReasonTrainer):
    stage = "supervised"
