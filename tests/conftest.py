"""Test configuration: standalone scripts that tests start in subprocesses are not collected."""

collect_ignore = ["scripts"]
