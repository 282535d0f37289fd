"""The human-facing report of a pipeline run, and the viewer of its samples, in one self-contained folder.

``write_report(folder, ...)`` writes ``report.md`` and ``report.html`` (rendered from the Jinja2 templates in
``templates/``), ``report.json`` (headline numbers and provenance, read by the run index), ``report_files/`` (loss
curve, IoU histogram, gallery thumbnails) and ``viewer/`` (every sample, :mod:`llavaseg.report.viewer`); every link is
relative, so the folder can be moved, zipped or served as is. Sections: notes, segmentation (gIoU/cIoU per split and
query kind in percent, scores by query kind, stage-1 parse status and dataset family, the IoU histogram, the paper's
Table 1), dialogue quality (ROUGE-L, CIDEr), stage 1 (counts, throughput, every error message), training (loss and
learning rate), a gallery of the best and worst cases, and provenance (models, SAM variant, hyper-parameters, commit,
package versions). Every text is escaped.

``llavaseg.report.runs`` gives each run its own folder under ``<work_dir>/reports/`` and writes the index page that
compares them.
"""

from llavaseg.report.page import FILES_DIR, VIEWER_DIR, select_cases, write_report
from llavaseg.report.pictures import (
    GT_OUTLINE,
    OUTLINE_DARK,
    PRED_OUTLINE,
    THUMBNAIL_SIZE,
    draw_outlines,
    outline_bands,
)
from llavaseg.report.tables import PAPER_TABLE_1, segmentation_rows

__all__ = ["FILES_DIR", "GT_OUTLINE", "OUTLINE_DARK", "PAPER_TABLE_1", "PRED_OUTLINE", "THUMBNAIL_SIZE",
           "VIEWER_DIR", "draw_outlines", "outline_bands", "segmentation_rows", "select_cases", "write_report"]
