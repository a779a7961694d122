"""Service functions shared by the CLI, the web console and the REST API.

One place changes a domain's TLS policy; the CLI and the web call it.
"""
