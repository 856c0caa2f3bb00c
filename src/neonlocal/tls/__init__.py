"""TLS material of our own: the local CA and certificates, and the system's trust store.

- ``local``: the certificate local clients see, made once by a short-lived helper.
- ``certs``: making a CA and certificates (cryptography; never imported by the daemon).
- ``system_ca``: the system's certificate authorities, for every connection we verify.

The TLS connections themselves (contexts, handshakes) are the proxy's: ``proxy/tls.py``.
"""
