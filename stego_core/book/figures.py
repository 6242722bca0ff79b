"""The study's figures (Figure 3, Figure 4, the appendix) under one name, as the chapters call them
(``figures.dimension_table(...)``, ``figures.dimension_chart(...)``): the tables and findings of ``figure_data``,
the paired statistics of ``figure_stats`` and the Altair charts of ``figure_charts``."""
from ..config import METHOD_LABELS
from .figure_charts import differences_chart, dimension_chart, variance_chart
from .figure_data import (
                          METHOD_COLORS,
                          PROBE_TITLES,
                          SERIES_LABELS,
                          SERIES_ORDER,
                          SPREADS,
                          VARIANCE_STYLES,
                          backbone_comparison,
                          dimension_findings,
                          dimension_table,
                          dimension_ticks,
                          extended_study_rows,
                          extended_study_status,
                          paper_dimension_table,
                          pca_variance_curves,
                          pivot_table,
                          variance_findings,
                          variance_frame,
)
from .figure_stats import convergence_table, differences_table, differences_verdict, paired_differences

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "SERIES_LABELS", "PROBE_TITLES",
           "SERIES_ORDER", "SPREADS", "VARIANCE_STYLES",
           "backbone_comparison", "convergence_table", "differences_chart", "differences_table", "differences_verdict",
           "dimension_chart", "dimension_findings",
           "dimension_table", "dimension_ticks", "extended_study_rows", "extended_study_status", "paired_differences",
           "paper_dimension_table", "pca_variance_curves", "pivot_table", "variance_chart", "variance_findings",
           "variance_frame"]
