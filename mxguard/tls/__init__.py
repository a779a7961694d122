"""TLS for both hops: certificates, SSLContext factories and the per-domain policy words."""
