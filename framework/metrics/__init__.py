"""What ``self.log`` records: the collector the loops drive, and the pieces it is built from."""

from framework.metrics.batch_size import infer_batch_size
from framework.metrics.collector import MetricCollector
from framework.metrics.floats import to_floats
from framework.metrics.rules import RULES, LogRule

__all__ = ["LogRule", "MetricCollector", "RULES", "infer_batch_size", "to_floats"]
