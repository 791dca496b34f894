"""The daemon: its core, the REST API and OpenAPI document, metrics, configuration, restart recovery, `migd serve` and sd_notify."""
