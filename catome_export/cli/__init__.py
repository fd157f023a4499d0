"""Command-line interface (``catome-export``)."""
