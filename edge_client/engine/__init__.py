"""The device-side engine: masked SPSA on the side-car (spsa), client data and losses (data), memory
planning (planner). Model loading and the side-car itself live in shared/ (the coordinator's export
needs the same effective weights)."""
