"""The long-lived edge client: config, durable state + outbox, telemetry, the round loop, `meerkat client`."""
