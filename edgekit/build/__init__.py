"""The build: stage engine, the flow, its config, report and verify."""
