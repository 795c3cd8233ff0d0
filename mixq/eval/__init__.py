"""Evaluation: corpora and calibration windows, perplexity / KL / agreement, and the format study."""

from mixq.eval.corpus import calibration_windows, eval_windows, load_token_source, wiki_split
from mixq.eval.lm_metrics import (Agreement, EmbeddingAgreement, Perplexity, embedding_agreement,
                                  logit_agreement, perplexity)
from mixq.eval.study import (ON_GRID_DB, LayerResult, SpecSummary, StudyResult, spec_family, sqnr_db, study,
                             summarize)

__all__ = [
    "ON_GRID_DB", "Agreement", "EmbeddingAgreement", "LayerResult", "Perplexity", "SpecSummary", "StudyResult",
    "calibration_windows", "embedding_agreement", "eval_windows", "load_token_source", "logit_agreement",
    "perplexity", "spec_family", "sqnr_db", "study", "summarize", "wiki_split",
]
