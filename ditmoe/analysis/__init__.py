"""Analyses of trained models: expert routing statistics and their plots (paper §3.3), and EC-DiT's adaptive
compute (experts per image token)."""

from .adaptive_compute import AdaptiveCompute, ExpertsPerTokenRecorder, record_adaptive_compute
from .routing_stats import RoutingRecorder, RoutingStats

__all__ = ["AdaptiveCompute", "ExpertsPerTokenRecorder", "RoutingRecorder", "RoutingStats", "record_adaptive_compute"]
