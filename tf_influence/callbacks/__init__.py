"""Keras callbacks: influence analysis and TracIn checkpoints during ``model.fit``."""

from tf_influence.callbacks.influence_callback import InfluenceCallback
from tf_influence.callbacks.tracin_checkpoints import TracInCheckpoints

__all__ = ["InfluenceCallback", "TracInCheckpoints"]
