//! `RevocationList::from_der_verified` on arbitrary bytes against a fixed root. The
//! signature is checked before the extensions and entries, so when the input is one DER
//! SEQUENCE it is also treated as a TBSCertList, signed by the root and parsed again: that
//! reaches the CRL-number, critical-extension, serial and time checks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use molt_protocol::cert::RevocationList;
use molt_protocol_fuzz::{is_one_sequence, pki, sign_tbs};

fuzz_target!(|data: &[u8]| {
    check(data);
    if is_one_sequence(data) {
        let signed = sign_tbs(data, &pki().root_key).expect("software keys sign");
        check(&signed);
    }
});

fn check(der: &[u8]) {
    let issuer = &pki().root;
    let Ok(list) = RevocationList::from_der_verified(der, issuer) else { return };
    assert_eq!(list.der(), der);
    let _ = (list.crl_number(), list.this_update(), list.next_update(), list.revoked().len());
    assert_eq!(list.issuer_common_name(), issuer.common_name());
    let again = RevocationList::from_pem_verified(&list.to_pem(), issuer).expect("a verified crl verifies again");
    assert_eq!(again.der(), list.der());
    assert_eq!(again.revoked(), list.revoked());
    assert_eq!(again.crl_number(), list.crl_number());
}
