"""``cleanroom pki ...``: a CA and SPIFFE-identity certificates for mTLS.

* ``cleanroom pki init --out DIR``: a new CA plus broker, operator, party and sidecar
  certificates.
* ``cleanroom pki issue --dir DIR --party NAME``: one more identity (or a rotated one, with
  ``--force``) signed by the CA in DIR.
* ``cleanroom pki show CERT``: the SPIFFE ID, validity, issuer and fingerprint of a certificate.
* ``cleanroom pki verify CERT --ca FILE``: the checks the TLS handshake will make, offline.
* ``cleanroom pki revoke --dir DIR CERT``: put a certificate on the CA's revocation list
  (``DIR/crl.pem``).
* ``cleanroom pki crl --dir DIR``: re-sign that list with a fresh nextUpdate (or create it).

Heavy imports (cryptography) happen inside the handlers so that ``cleanroom --help`` is fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pki", help="create a CA and issue SPIFFE certificates")
    pki_sub = p.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)

    init = pki_sub.add_parser(
        "init",
        help="create a CA and the clean room's certificates",
        description="Writes ca.crt/ca.key and a certificate and key (mode 0600) for the "
        "broker, the operator, each party and each sidecar.",
    )
    init.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    init.add_argument(
        "--trust-domain", default="cleanroom.local", help="SPIFFE trust domain (%(default)s)"
    )
    init.add_argument(
        "--party",
        dest="parties",
        action="append",
        metavar="NAME",
        help="a party to issue a certificate for (repeatable; default: advertiser, publisher)",
    )
    init.add_argument(
        "--sidecar",
        dest="sidecars",
        action="append",
        metavar="ID",
        help="a sidecar to issue a certificate for (repeatable; default: sidecar-1)",
    )
    init.add_argument(
        "--broker-dns",
        action="append",
        metavar="NAME",
        help="DNS name clients dial the broker by (repeatable; default: localhost)",
    )
    init.add_argument(
        "--broker-ip",
        action="append",
        metavar="IP",
        help="IP address clients dial the broker by (repeatable; default: 127.0.0.1)",
    )
    init.add_argument("--valid-days", type=int, default=365, help="leaf validity (%(default)s)")
    init.add_argument("--ca-valid-days", type=int, default=3650, help="CA validity (%(default)s)")
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA (re-issues everything)"
    )
    init.set_defaults(func=_init)

    issue = pki_sub.add_parser(
        "issue",
        help="issue one more identity with an existing CA",
        description="Signs a new certificate with DIR/ca.key. Re-issuing an existing identity "
        "(certificate rotation) needs --force.",
    )
    issue.add_argument("--dir", required=True, type=Path, help="directory holding ca.crt/ca.key")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--operator", action="store_true", help="the operator")
    who.add_argument("--party", metavar="NAME", help="a party")
    who.add_argument("--sidecar", metavar="ID", help="a sidecar")
    who.add_argument("--broker", action="store_true", help="the broker (server and client)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME", help="DNS SAN")
    issue.add_argument("--ip", action="append", default=[], metavar="IP", help="IP SAN")
    issue.add_argument("--valid-days", type=int, default=365, help="validity (%(default)s)")
    issue.add_argument("--force", action="store_true", help="replace existing files (rotation)")
    issue.set_defaults(func=_issue)

    show = pki_sub.add_parser("show", help="print a certificate's identity and validity")
    show.add_argument("cert", type=Path, metavar="CERT", help="PEM certificate file")
    show.set_defaults(func=_show)

    verify = pki_sub.add_parser(
        "verify", help="check a certificate against a CA bundle and the clock"
    )
    verify.add_argument("cert", type=Path, metavar="CERT", help="PEM certificate (chain) file")
    verify.add_argument("--ca", required=True, type=Path, help="PEM CA bundle")
    verify.add_argument("--key", type=Path, help="also check that this key matches")
    verify.add_argument(
        "--usage", choices=("client", "server"), help="also require this TLS usage (EKU)"
    )
    verify.set_defaults(func=_verify)

    revoke = pki_sub.add_parser(
        "revoke",
        help="revoke a certificate (add it to DIR/crl.pem)",
        description="Adds the certificate's serial to the CRL of the CA in DIR and re-signs "
        "the CRL. A broker with the CRL in [tls] crl_files refuses the certificate within "
        "about a second, without a restart.",
    )
    revoke.add_argument("--dir", required=True, type=Path, help="directory holding ca.crt/ca.key")
    revoke.add_argument("cert", type=Path, metavar="CERT_FILE", help="PEM certificate to revoke")
    revoke.add_argument(
        "--reason",
        default="unspecified",
        choices=_REASONS,
        help="RFC 5280 revocation reason (%(default)s)",
    )
    revoke.add_argument(
        "--days", type=int, default=7, metavar="N", help="CRL valid for N days (%(default)s)"
    )
    revoke.set_defaults(func=_revoke)

    crl = pki_sub.add_parser(
        "crl",
        help="re-sign the CA's revocation list with a fresh nextUpdate",
        description="Re-signs DIR/crl.pem (creating an empty one when missing) so that it is "
        "valid for N more days. A broker refuses every call once its CRL is stale, so run "
        "this well before the nextUpdate passes.",
    )
    crl.add_argument("--dir", required=True, type=Path, help="directory holding ca.crt/ca.key")
    crl.add_argument(
        "--days", type=int, default=7, metavar="N", help="CRL valid for N days (%(default)s)"
    )
    crl.set_defaults(func=_crl)


#: Kept in step with pki.crl.REASONS (tests/unit/pki/test_crl.py checks it) without importing
#: cryptography for ``cleanroom --help``.
_REASONS = (
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "privilege-withdrawn",
)


def _init(args: argparse.Namespace) -> int:
    from pki.ca import init_pki

    layout = init_pki(
        args.out,
        trust_domain=args.trust_domain,
        parties=args.parties if args.parties is not None else ("advertiser", "publisher"),
        sidecars=args.sidecars if args.sidecars is not None else ("sidecar-1",),
        broker_dns=args.broker_dns if args.broker_dns is not None else ("localhost",),
        broker_ips=args.broker_ip if args.broker_ip is not None else ("127.0.0.1",),
        force=args.force,
        valid_days=args.valid_days,
        ca_valid_days=args.ca_valid_days,
    )
    print(f"wrote {layout.ca_cert}  (CA, trust domain {layout.trust_domain})")
    print(f"wrote {layout.ca_key}  (CA private key, mode 0600; keep it offline)")
    for ident in layout.identities:
        cert, key = layout.paths_for(ident)
        print(f"wrote {cert}  ({ident})")
        print(f"wrote {key}  (private key, mode 0600)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from pki.ca import issue_into

    if args.operator:
        kind, name = "operator", ""
    elif args.broker:
        kind, name = "broker", ""
    elif args.party is not None:
        kind, name = "party", args.party
    else:
        kind, name = "sidecar", args.sidecar
    cert, key = issue_into(
        args.dir,
        kind=kind,
        name=name,
        dns_names=args.dns,
        ip_addresses=args.ip,
        valid_days=args.valid_days,
        force=args.force,
    )
    from pki.identity import spiffe_id_from_certificate
    from pki.tls import load_pem

    print(f"wrote {cert}  ({spiffe_id_from_certificate(load_pem(cert))})")
    print(f"wrote {key}  (private key, mode 0600)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from pki.ca import trust_domain_of_ca
    from pki.errors import IdentityError
    from pki.identity import spiffe_id_from_certificate
    from pki.tls import load_certificates

    certs = load_certificates(args.cert)
    for i, cert in enumerate(certs):
        if i:
            print()
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if is_ca:
            try:
                identity = f"(CA certificate of trust domain {trust_domain_of_ca(cert)})"
            except IdentityError:
                identity = "(CA certificate)"
        else:
            try:
                identity = str(spiffe_id_from_certificate(cert))
            except IdentityError as e:
                identity = f"(none: {e})"
        fmt = "%Y-%m-%d %H:%M:%S UTC"
        print(f"spiffe id:   {identity}")
        print(f"subject:     {cert.subject.rfc4514_string() or '(empty)'}")
        print(f"issuer:      {cert.issuer.rfc4514_string() or '(empty)'}")
        print(f"not before:  {cert.not_valid_before_utc.strftime(fmt)}")
        print(f"not after:   {cert.not_valid_after_utc.strftime(fmt)}")
        print(f"serial:      {cert.serial_number:x}")
        print(f"sha256:      {cert.fingerprint(hashes.SHA256()).hex(':')}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pki.tls import TlsFiles, check_certificate, check_files, load_certificates

    if args.key is not None:
        identity = check_files(
            TlsFiles(cert_file=args.cert, key_file=args.key, ca_file=args.ca), usage=args.usage
        )
    else:
        identity = check_certificate(
            load_certificates(args.cert), load_certificates(args.ca), usage=args.usage
        )
    print(f"ok: {identity}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from pki.crl import revoke

    done = revoke(args.dir, args.cert, reason=args.reason, days=args.days)
    state = "revoked" if done.newly_revoked else "already revoked"
    print(
        f"{state}: serial {done.serial:x} in {done.crl.path} (CRL #{done.crl.number}, "
        f"{done.crl.entries} revoked, next update {done.crl.next_update:%Y-%m-%d %H:%M:%S} UTC)"
    )
    return 0


def _crl(args: argparse.Namespace) -> int:
    from pki.crl import refresh

    info = refresh(args.dir, days=args.days)
    print(
        f"wrote {info.path} (CRL #{info.number}, {info.entries} revoked, "
        f"next update {info.next_update:%Y-%m-%d %H:%M:%S} UTC)"
    )
    return 0
