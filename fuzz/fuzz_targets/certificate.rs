//! `Certificate::from_der` on arbitrary bytes, with DER and PEM round trips when it parses,
//! and `verify_chain` of the input as a leaf under the fixed org CA. Parsing checks no
//! signature but chain verification does, so when the input is one DER SEQUENCE it is also
//! treated as a TBSCertificate, signed by the org CA and verified: that reaches the
//! validity, role and key-usage checks behind the signature.

#![no_main]

use libfuzzer_sys::fuzz_target;
use molt_protocol::cert::{Certificate, ExpectedRole, Revocations, verify_chain};
use molt_protocol_fuzz::{NOW, is_one_sequence, pki, sign_tbs};

fuzz_target!(|data: &[u8]| {
    check(data);
    if is_one_sequence(data) {
        let signed = sign_tbs(data, &pki().org_key).expect("software keys sign");
        check(&signed);
    }
});

fn check(der: &[u8]) {
    if let Ok(certificate) = Certificate::from_der(der) {
        assert_eq!(certificate.der(), der);
        let _ = (certificate.serial(), certificate.role(), certificate.public_key(), certificate.validity());
        let _ = (certificate.common_name(), certificate.path_len(), certificate.dns_names());
        assert_eq!(Certificate::from_der(certificate.der()).as_ref(), Ok(&certificate));
        assert_eq!(Certificate::from_pem(&certificate.to_pem()).as_ref(), Ok(&certificate));
    }
    let fixtures = pki();
    let chain = [der, fixtures.org.der()];
    for expected in [ExpectedRole::AnyAgent, ExpectedRole::AnyEdge] {
        let _ = verify_chain(&chain, &fixtures.anchors, &Revocations::default(), NOW, expected);
    }
}
