"""Registers the `dual` rollout backend with verl. Loaded in every process that imports verl, through the
setuptools entry point `optimal_sampling = recipe.optimal_sampling.verl.plugin` in group `verl.plugins`.

Owns the two registry entries; imports none of our heavy modules (the replica class is loaded on first use, the
adapter by its dotted path). verl swallows plugin import errors at debug level, so keep this module trivial.
"""

from importlib import import_module

from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry

from . import ROLLOUT_NAME


def _load_replica():
    return import_module("recipe.optimal_sampling.verl.replica").DualReplica


def register() -> None:
    """Make `actor_rollout_ref.rollout.name=dual` resolve to our adapter and replica (idempotent)."""
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "recipe.optimal_sampling.verl.adapter.DualServerAdapter"
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)


register()
