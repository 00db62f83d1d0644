"""Entrypoints for `ray job submit`: each parses arguments, calls churnlib, prints a result line."""
