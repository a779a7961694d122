"""The outbound relay: who may relay, MX lookup, delivery TLS per destination, DKIM signing."""
