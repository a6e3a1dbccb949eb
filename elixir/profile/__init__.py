"""Profiles of one training step, traced on the meta device: what the planner decides from."""

from elixir.profile.data import OpRecord, Profile
from elixir.profile.trace import profile

__all__ = ["OpRecord", "Profile", "profile"]
