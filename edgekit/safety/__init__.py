"""Safety: the built-in suite, judges, metrics, the ICET scan and the gate."""
