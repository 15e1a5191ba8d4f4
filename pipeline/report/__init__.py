"""Report rendering: markdown helpers, figures, and the sections shared by the report and the index."""
