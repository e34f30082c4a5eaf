"""Reports: collect result records into pandas, join the paper numbers, render markdown/CSV/plots.

This package only knows records (JSON files) and plain data. It never imports torch; of the harness
it imports only ``harness.atomic`` (standard library only) to write its files atomically, so a report
can be built on any machine that holds the output folder and this repository, without a GPU stack.
"""

from reports.collect import check_expected, expected_frame, load_records, read_records
from reports.paper import load_paper_numbers
from reports.tables import RECORD_FIELDS, comparison_table, to_markdown, with_code_column, write_report

__all__ = [
    "RECORD_FIELDS",
    "check_expected",
    "read_records",
    "comparison_table",
    "expected_frame",
    "load_paper_numbers",
    "load_records",
    "to_markdown",
    "with_code_column",
    "write_report",
]
