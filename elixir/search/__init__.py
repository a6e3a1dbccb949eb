"""Planning: the cost model replays a profiled step under a plan; the search picks the fastest
plan that fits, and given tokens per step also the micro-batch, accumulation and checkpointing.
Nothing here allocates model memory or imports the runtime."""

from elixir.search.api import BatchPlan, plan, plan_batch
from elixir.search.cost import Prediction, simulate
from elixir.search.search import CHECKPOINT_OPTIONS, PlanDoesNotFitError, search

__all__ = ["CHECKPOINT_OPTIONS", "BatchPlan", "PlanDoesNotFitError", "Prediction", "plan", "plan_batch", "search",
           "simulate"]
