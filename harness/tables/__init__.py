"""``harness tables``: the ablation tables, plots and a long-format export, regenerated from MLflow.

Reading: :mod:`.collect`; statistics: :mod:`.ablation`; files: :mod:`.render`, :mod:`.plots`,
:mod:`.export`; the entry point :func:`write_tables` lives in :mod:`.write`.
"""

from harness.tables.collect import TablesError
from harness.tables.write import TablesResult, write_tables

__all__ = ["TablesError", "TablesResult", "write_tables"]
