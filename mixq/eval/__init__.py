"""Evaluation: the format study (weight error per layer x spec), reports and plots."""

from mixq.eval.study import (ON_GRID_DB, LayerResult, SpecSummary, StudyResult, spec_family, sqnr_db, study,
                             summarize)

__all__ = [
    "ON_GRID_DB", "LayerResult", "SpecSummary", "StudyResult", "spec_family", "sqnr_db", "study", "summarize",
]
