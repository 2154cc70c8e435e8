"""The main policy (the VLA whose decoding the draft model speeds up): config and model."""
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy, Observation, PolicyCache

__all__ = ["BackboneConfig", "MainPolicy", "Observation", "PolicyCache", "PolicyConfig", "build_vocab"]
