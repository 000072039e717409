"""The ``qjob`` command line (``qjob_cli.main``): it builds on the operator's builders and the runner."""
