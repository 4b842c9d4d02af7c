"""Certificate files: loading with one-line errors, SANs and expiry, subjects as RFC 4514 strings."""

from __future__ import annotations

import datetime
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

from mongoproxy.errors import StartupError

log = logging.getLogger("mongoproxy")

_DN_KEYS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
}


@dataclass(frozen=True)
class CertInfo:
    """What the proxy needs to know of a certificate file: its names, subject and expiry."""

    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    subject: str
    not_after: float  # Unix time

    def matches(self, server_name: str) -> bool:
        """True when `server_name` (SNI) is one of the SANs, wildcards matching one label."""
        name = server_name.lower().rstrip(".")
        for san in self.dns_names:
            san = san.lower().rstrip(".")
            if san == name or (san.startswith("*.") and "." in name and name.split(".", 1)[1] == san[2:]):
                return True
        return name in self.ip_addresses


def format_subject(subject: Any) -> str:
    """A certificate subject as ssl gives it -> an RFC 4514 string (last RDN first), e.g. CN=app,O=acme."""
    rdns = []
    for rdn in subject or ():
        rdns.append("+".join(f"{_DN_KEYS.get(k, k)}={_escape_dn(v)}" for k, v in rdn))
    return ",".join(reversed(rdns))


def _escape_dn(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in str(value))
    if out.startswith(("#", " ")):
        out = "\\" + out
    return out


def cert_info(path: str) -> CertInfo:
    """Names, subject and expiry of the first certificate in a PEM file; ValueError when there is none."""
    # cryptography, not ssl: ssl has no public decoder for a certificate file (only the private
    # _ssl._test_decode_cert, which any CPython release may drop), and SNI selection depends on these SANs.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    subject = cert.subject.rfc4514_string({NameOID.EMAIL_ADDRESS: "emailAddress"})
    return CertInfo(dns, ips, subject, cert.not_valid_after_utc.timestamp())


def check_file(path: str, flag: str) -> None:
    """One line naming the flag when a file is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise StartupError(f"{flag} {path}: no such file; check the path") from None
    except IsADirectoryError:
        raise StartupError(f"{flag} {path} is a directory: give a PEM file") from None
    except OSError as exc:
        raise StartupError(f"cannot read {flag} {path}: {exc.strerror}; check its permissions") from None


def load_chain(ctx: ssl.SSLContext, cert: str, key: str, cert_flag: str, key_flag: str) -> None:
    check_file(cert, cert_flag)
    check_file(key, key_flag)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".upper()
        if "KEY_VALUES_MISMATCH" in text:
            raise StartupError(
                f"{key_flag} {key} does not match {cert_flag} {cert}: give the key the certificate was issued for"
            ) from None
        raise StartupError(
            f"cannot load {cert_flag} {cert} with {key_flag} {key}: {exc.reason or exc}; "
            "both must be PEM (certificate chain, unencrypted private key)"
        ) from None


def load_ca(ctx: ssl.SSLContext, path: str, flag: str) -> None:
    check_file(path, flag)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise StartupError(f"{flag} {path} is not a PEM CA certificate: {exc.reason or exc}") from None


def expiry_warning(path: str, flag: str, info: CertInfo) -> None:
    if info.not_after < time.time():
        when = datetime.datetime.fromtimestamp(info.not_after, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        log.warning("%s %s expired on %s: peers will refuse it; renew it", flag, path, when)
