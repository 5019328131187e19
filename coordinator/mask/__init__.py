"""The offline mask tool: `builder` (scores, top-k, concentration), `report` (shares, overlap, tables,
PNG) and `cli` (`meerkat mask build|report`). Runs once on a server, never inside the round loop."""
