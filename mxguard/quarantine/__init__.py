"""Quarantine: messages the filters held, sealed at rest, per recipient."""
