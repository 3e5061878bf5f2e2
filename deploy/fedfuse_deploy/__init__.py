"""Deployment tooling: real SuperLink/SuperNode processes, TLS and node credentials."""
