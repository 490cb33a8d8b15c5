"""`gpuctl certs init|issue`: a development CA and certificates, as files in one directory.

Local file work only (no coordinator). Everything goes through gpulease.common.pki, which uses the
`cryptography` package (never openssl), writes keys with mode 0600 and never overwrites a file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpulease.common import pki
from gpulease.common.identity import Kind, Role


def init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    cert = pki.init_ca(directory, days=args.days)
    print(f"created a development CA in {directory}: {cert} (certificate), {directory / pki.CA_KEY} (key, mode 0600)")
    print(f"issue certificates with: gpuctl certs issue coordinator|agent|user NAME --dir {directory}")
    return 0


def issue(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    kind = Kind(args.kind)
    if kind is Kind.USER:
        issued = pki.issue(directory, kind, args.name, role=Role(args.role), tenant=args.tenant, days=args.days)
    else:
        issued = pki.issue(directory, kind, args.name, hosts=tuple(args.host), days=args.days)
    identity = pki.principal_of(issued.cert.read_bytes())
    names = f"{identity.id}" if identity is not None else f"{kind.value}:{args.name}"
    if identity is not None and identity.role is not None:
        names += f" (role {identity.role.value}, tenant {identity.tenant})"
    print(f"issued {issued.cert} for {names}, signed by {directory / pki.CA_CERT}")
    print(f"key: {issued.key} (mode 0600)")
    return 0
