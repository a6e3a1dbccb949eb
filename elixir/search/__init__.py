"""Planning: the cost model replays a profiled step under a plan; the search picks the fastest
plan that fits. Nothing here allocates model memory or imports the runtime."""

from elixir.search.api import plan
from elixir.search.cost import Prediction, simulate
from elixir.search.search import PlanDoesNotFitError, search

__all__ = ["PlanDoesNotFitError", "Prediction", "plan", "search", "simulate"]
