"""The framework-free half of every callback: the watcher, its sinks and the log vocabulary."""

from gradwatch.options import WatchConfig
from gradwatch.watch.watcher import HEALTH_BLOCK, Watcher, WatchRecords, global_norm

__all__ = ["HEALTH_BLOCK", "WatchConfig", "WatchRecords", "Watcher", "global_norm"]
