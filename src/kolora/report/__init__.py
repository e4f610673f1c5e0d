"""The report stage: report/report.html and its figures."""
