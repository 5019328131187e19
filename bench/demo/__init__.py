"""`meerkat demo` and its helpers: a local broker, a read-only fleet observer, a tiny toy model."""
