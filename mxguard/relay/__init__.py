"""The outbound relay: the organizations' own servers sending to the internet through the gateway.

* :mod:`mxguard.relay.access` — who may relay (source networks, SMTP AUTH, client certificates);
* :mod:`mxguard.relay.ratelimit` — messages per hour per sender and per organization;
* :mod:`mxguard.relay.accept` — end of DATA for relayed recipients: filters, limits, sealed spool;
* :mod:`mxguard.relay.mx` — MX lookup (RFC 5321 5.1, null MX RFC 7505);
* :mod:`mxguard.relay.destinations` — delivery TLS per destination (overrides, DANE, MTA-STS);
* DKIM signing per sending domain with the domain's sealed key.
"""
