"""The spool: mail held sealed while a route is unreachable, delivered later; DSNs."""
