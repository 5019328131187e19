"""`meerkat bench attacks`: hostile devices of the in-process fleet against the aggregation rules (issue 26)."""
