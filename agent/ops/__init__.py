"""Operator commands and views: status, history, retry, report, doctor, trust-host, keygen,
validate, metrics, demo."""
