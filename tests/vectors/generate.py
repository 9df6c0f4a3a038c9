"""Makes the regression vectors with tpm2-tools on a fresh swtpm.

``python -m tests.vectors.generate`` rewrites the JSON files beside this module. The integration
tests call :func:`build_quote_vectors` and :func:`build_key_vectors` on their own swtpm, so the
evidence that the stored vectors hold is also re-made and re-checked on every integration run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from evidence.pcr import MeasurementEvent
from tests.harness.swtpm import SWTPM_LOCALCA_DIR, Swtpm, manufacture
from tests.vectors import tpm2tools as tt
from tests.vectors.evidence import (
    EkCertVector,
    KeyVector,
    QuoteVector,
    mutations,
    write_vectors,
)

#: The "files" the tests measure into PCR 23, in order (path, content).
WORKLOAD = [
    ("model/train.py", b"print('train the model')\n"),
    ("data/schema.json", b'{"columns": ["user", "spend"]}\n'),
    ("bin/run.sh", b"#!/bin/sh\nexec python3 model/train.py\n"),
]

#: The CA certificates of swtpm-tools' local CA, root first.
LOCALCA_PEMS = (
    SWTPM_LOCALCA_DIR / "swtpm-localca-rootca-cert.pem",
    SWTPM_LOCALCA_DIR / "issuercert.pem",
)


def _quote_vector(
    name: str,
    guards: str,
    ak: tt.KeyFiles,
    q: tt.QuoteFiles,
    *,
    expect: str = "valid",
    event_log: tuple[MeasurementEvent, ...] | None = None,
    pcr_format: str = "serialized",
    ek: tt.KeyFiles | None = None,
) -> QuoteVector:
    from broker.quote import pcr_values_from_tools

    attest = q.message.read_bytes()
    pcr_file = q.pcrs.read_bytes()
    return QuoteVector(
        name=name,
        guards=guards,
        expect=expect,
        ak_public=ak.public.read_bytes(),
        attest=attest,
        signature=q.signature.read_bytes(),
        pcr_values=pcr_values_from_tools(
            pcr_file,
            attest=attest,
            pcr_format="values" if pcr_format == "values" else "serialized",
        ),
        qualifying_data=q.qualification,
        event_log=event_log,
        tools_pcr_file=pcr_file,
        ek_public=None if ek is None else ek.public.read_bytes(),
    )


def build_quote_vectors(tpm: Swtpm, workdir: Path) -> list[QuoteVector]:
    """Makes EK, AKs and quotes with tpm2-tools on ``tpm``; returns every quote vector."""
    ek = tt.create_ek(tpm, workdir)
    rsa = tt.create_ak(tpm, workdir, ek, prefix="ak-rsa")
    ecc = tt.create_ak(tpm, workdir, ek, alg="ecc", scheme="ecdsa", prefix="ak-ecc")
    pss = tt.create_ak(tpm, workdir, ek, scheme="rsapss", prefix="ak-rsapss")
    other = tt.create_ak(tpm, workdir, ek, prefix="ak-other")
    other_ek = tt.create_ek(tpm, workdir, alg="ecc", prefix="ek-ecc")

    tt.reset_pcr23(tpm)
    log = tt.measure(tpm, WORKLOAD)

    def quote(
        ak: tt.KeyFiles,
        prefix: str,
        *,
        pcr_list: str = "sha1:23+sha256:23",
        pcr_format: str = "serialized",
        scheme: str | None = None,
    ) -> tt.QuoteFiles:
        return tt.quote(
            tpm,
            workdir,
            ak,
            prefix=prefix,
            pcr_list=pcr_list,
            pcr_format=pcr_format,
            scheme=scheme,
        )

    rsa_valid = _quote_vector(
        "quote-rsa-rsassa-valid",
        "a tpm2_quote of sha1:23+sha256:23 by a tpm2_createak RSA AK, with its event log",
        rsa,
        quote(rsa, "q-rsa"),
        event_log=log,
        ek=ek,
    )
    ecc_valid = _quote_vector(
        "quote-ecc-p256-ecdsa-valid",
        "a tpm2_quote of sha1:23+sha256:23 by a tpm2_createak ECC P-256 AK, with its event log",
        ecc,
        quote(ecc, "q-ecc"),
        event_log=log,
        ek=ek,
    )
    vectors = [rsa_valid, ecc_valid]
    vectors += mutations(rsa_valid, "quote-rsa")
    vectors += mutations(ecc_valid, "quote-ecc")
    vectors += [
        _quote_vector(
            "quote-rsa-values-pcr-file-valid",
            "a tpm2_quote whose --pcr file is in the values format (-F values)",
            rsa,
            quote(rsa, "q-rsa-values", pcr_format="values"),
            pcr_format="values",
            ek=ek,
        ),
        _quote_vector(
            "quote-rsa-rsapss-valid",
            "a tpm2_quote by an RSAPSS AK (tpm2_checkquote itself cannot verify these)",
            pss,
            quote(pss, "q-pss", scheme="rsapss"),
            event_log=log,
            ek=ek,
        ),
        _quote_vector(
            "quote-rsa-sha1-only",
            "a quote of sha1:23 alone, when policy requires sha256:23",
            rsa,
            quote(rsa, "q-sha1", pcr_list="sha1:23"),
            expect="UnsupportedAlgorithmError",
            ek=ek,
        ),
        _quote_vector(
            "quote-rsa-selection-omits-pcr23",
            "a quote of sha256:16 that omits the required PCR 23",
            rsa,
            quote(rsa, "q-no23", pcr_list="sha256:16"),
            expect="PcrSelectionError",
            ek=ek,
        ),
        rsa_valid.derive(
            "quote-rsa-signer-not-the-eks-ak",
            "a valid quote whose AK is taken to be the child of another EK of the same TPM: "
            "its qualifiedSigner is not that AK's qualified name",
            "QualifiedSignerError",
            ek_public=other_ek.public.read_bytes(),
        ),
        rsa_valid.derive(
            "quote-rsa-other-ak",
            "a valid quote presented under another AK of the same TPM",
            "SignatureError",
            ak_public=other.public.read_bytes(),
        ),
        rsa_valid.derive(
            "quote-rsa-scheme-not-the-aks",
            "an RSASSA signature checked against an AK whose scheme is RSAPSS",
            "SignatureError",
            ak_public=pss.public.read_bytes(),
        ),
        rsa_valid.derive(
            "quote-rsa-ecc-ak-for-rsa-signature",
            "an RSA signature checked against an ECC AK",
            "SignatureError",
            ak_public=ecc.public.read_bytes(),
        ),
    ]
    attest, sig = tt.certify(tpm, workdir, rsa)
    vectors.append(
        QuoteVector(
            name="quote-rsa-certify-attest",
            guards="a genuine, signed TPM attest of another type (tpm2_certify)",
            expect="AttestTypeError",
            ak_public=rsa.public.read_bytes(),
            attest=attest.read_bytes(),
            signature=sig.read_bytes(),
            pcr_values={},
            qualifying_data=b"",
        )
    )
    return vectors


def build_key_vectors(tpm: Swtpm, workdir: Path) -> list[KeyVector]:
    """Keys for the attribute checks, made with tpm2_createek/createak/create."""
    ek_rsa = tt.create_ek(tpm, workdir, prefix="kv-ek-rsa")
    ek_ecc = tt.create_ek(tpm, workdir, alg="ecc", prefix="kv-ek-ecc")
    ak_rsa = tt.create_ak(tpm, workdir, ek_rsa, prefix="kv-ak-rsa")
    ak_ecc = tt.create_ak(tpm, workdir, ek_rsa, alg="ecc", scheme="ecdsa", prefix="kv-ak-ecc")
    not_restricted = tt.create_key(
        tpm,
        workdir,
        key_alg="rsa2048:rsassa-sha256",
        attributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        prefix="kv-not-restricted",
    )
    rsa1024 = tt.create_key(
        tpm,
        workdir,
        key_alg="rsa1024:rsassa-sha256:null",
        attributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
        prefix="kv-rsa1024",
    )
    bad = "KeyAttributeError"
    return [
        KeyVector(
            "key-rsa-createak", "a tpm2_createak RSA AK", ak_rsa.public.read_bytes(), "valid", bad
        ),
        KeyVector(
            "key-ecc-createak", "a tpm2_createak ECC AK", ak_ecc.public.read_bytes(), "valid", bad
        ),
        KeyVector(
            "key-rsa-not-restricted",
            "a signing key without restricted (it could sign forged attests)",
            not_restricted.public.read_bytes(),
            bad,
            bad,
        ),
        KeyVector(
            "key-rsa-1024-restricted",
            "a restricted RSA-1024 signing key (too small)",
            rsa1024.public.read_bytes(),
            bad,
            bad,
        ),
        KeyVector(
            "key-rsa-createek", "a tpm2_createek RSA EK", ek_rsa.public.read_bytes(), bad, "valid"
        ),
        KeyVector(
            "key-ecc-createek", "a tpm2_createek ECC EK", ek_ecc.public.read_bytes(), bad, "valid"
        ),
    ]


def read_ek_certificate(tpm: Swtpm, workdir: Path, *, alg: str) -> tuple[bytes, bytes]:
    """The EK public (``tpm2_createek``) and its certificate (``tpm2_nvread``) for ``alg``."""
    # swtpm_setup certifies the RSA-2048 EK of the low-range template and the ECC P-384 EK of
    # the high-range template (TCG EK Credential Profile indices).
    index = {"rsa": "0x1c00002", "ecc384": "0x1c00016"}[alg]
    ek = tt.create_ek(tpm, workdir, alg=alg, prefix=f"ekcert-{alg}")
    out = workdir / f"ekcert-{alg}.der"
    tpm.tools("tpm2_nvread", index, "-o", str(out))
    return ek.public.read_bytes(), out.read_bytes()


def build_ekcert_vectors(tpm: Swtpm, workdir: Path) -> list[EkCertVector]:
    cas = tuple(p.read_bytes() for p in LOCALCA_PEMS)
    out = []
    for alg in ("rsa", "ecc384"):
        ek, cert = read_ek_certificate(tpm, workdir, alg=alg)
        out.append(
            EkCertVector(
                name=f"ekcert-{alg}-swtpm-localca",
                guards=f"swtpm's {alg.upper()} EK certificate (NV) against swtpm-localca's CA",
                ek_public=ek,
                certificate=cert,
                ca_pems=cas,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="cleanroom-vectors-") as tmp:
        work = Path(tmp)
        manufacture(work / "state")
        tpm = Swtpm(state_dir=work / "state")
        tpm.start()
        try:
            quotes = build_quote_vectors(tpm, work)
            keys = build_key_vectors(tpm, work)
            certs = build_ekcert_vectors(tpm, work)
        finally:
            tpm.stop()
    write_vectors([*quotes, *keys, *certs])
    print(f"wrote {len(quotes)} quote, {len(keys)} key and {len(certs)} EK certificate vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
