"""Robustness evaluation: the 15 common corruptions at severities 1-5 (corruptions), metrics of every
method under them and out-of-distribution detection (evaluate, ood), and their plots (plots).
`hyperkern compare --shift` and `hyperkern evaluate --shift` run it (cli); docs/robustness.md
describes it. Corrupting images needs the robustness extra: pip install "hyperkern[robustness]".
"""
from hyperkern.robustness.corruptions import (CORRUPTION_GROUPS, CORRUPTIONS, SEVERITIES, CorruptionCache,
                                              check_corruptions, check_severities, corrupt_images, pixel_codec)
from hyperkern.robustness.evaluate import (classification_metrics, format_ood_table, format_shift_tables,
                                           ood_evaluation, predictions, shift_evaluation)
from hyperkern.robustness.ood import OODSplit, build_ood_splits, parse_ood

__all__ = [
    "CORRUPTIONS", "CORRUPTION_GROUPS", "SEVERITIES", "CorruptionCache", "check_corruptions", "check_severities",
    "corrupt_images", "pixel_codec", "classification_metrics", "predictions", "shift_evaluation", "ood_evaluation",
    "format_shift_tables", "format_ood_table", "OODSplit", "build_ood_splits", "parse_ood",
]
