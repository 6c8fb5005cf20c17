"""The audit report (``python -m mrc_ref.report``, docs/report.md): the
paper's figures regenerated on a model and its claims held against
measurements, written as Markdown, self-contained HTML and JSON.

``report.grid``      what is measured: methods × reductions, the paper's claims
``report.orchestration``  the measurements (every number from compress and
                     evaluate's own code) and :func:`report_files`, the whole run
``report.verdicts``  one verdict per claim
``report.figures``   the figures (the only module that imports matplotlib)
``report.render``    the document, its Markdown and HTML, the output folder
"""

from .orchestration import audit, report_files
from .render import document, render_html, render_markdown, write_report
from .verdicts import verdicts

__all__ = ["audit", "report_files", "verdicts", "document", "render_markdown", "render_html", "write_report"]
