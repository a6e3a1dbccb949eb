"""Profiles of one training step, traced on the meta device: what the planner decides from."""

from elixir.profile.trace import OpRecord, Profile, profile

__all__ = ["OpRecord", "Profile", "profile"]
