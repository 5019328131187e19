"""`meerkat bench learning`: federated learning quality of ZO masks vs dense vs backprop, and the MEERKAT-VP studies."""
