"""`meerkat bench fleet`: thousands of simulated MQTT devices against a real coordinator, and its CPU per message."""
