"""The `migd` command line: commands, the REST client, the progress display and `migd demo`."""
