"""Training DeepSeek-V4 (issue 11): the ``dsv4 train`` loop and its pieces.

* :mod:`.data` — corpus (default: the standard library's ``.py`` files), V4 tokenisation,
  train/validation split, deterministic batches;
* :mod:`.loss` — the vocabulary projection fused with cross-entropy, the training forward;
* :mod:`.routing` — loss-free bias balancing, sequence-wise balance loss, anticipatory routing;
* :mod:`.trainer` — schedules, the step, evaluation, resumable state;
* :mod:`.cli` — ``dsv4 train``; :mod:`.plot` — training curves.

The optimizer is :class:`dsv4.optim.Muon`. The design and the evidence are in
``docs/training.md``.
"""

from .data import Corpus, collect_files, stdlib_files, unigram_entropy
from .loss import head_features, linear_cross_entropy, model_losses, reference_backend
from .routing import RoutingController, bias_update, load_imbalance, sequence_balance_loss
from .trainer import TrainConfig, Trainer, lr_at, mtp_weight_at

__all__ = ["Corpus", "collect_files", "stdlib_files", "unigram_entropy", "head_features",
           "linear_cross_entropy", "model_losses", "reference_backend", "RoutingController",
           "bias_update", "load_imbalance", "sequence_balance_loss", "TrainConfig", "Trainer",
           "lr_at", "mtp_weight_at"]
