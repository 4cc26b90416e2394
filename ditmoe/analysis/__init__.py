"""Analyses of trained models: expert routing statistics and their plots (paper §3.3)."""

from .routing_stats import RoutingRecorder, RoutingStats

__all__ = ["RoutingRecorder", "RoutingStats"]
