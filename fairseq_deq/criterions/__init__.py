"""Criterions that add the equilibrium layer's Jacobian-regularization term and solver metrics."""
from .adaptive_loss_jr import AdaptiveLossJR
from .cross_entropy_jr import CrossEntropyJRCriterion

__all__ = ["AdaptiveLossJR", "CrossEntropyJRCriterion"]
