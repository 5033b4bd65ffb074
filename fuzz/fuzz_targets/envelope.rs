//! `EnvelopeView::decode` on arbitrary bytes. A decoded envelope must verify (or fail to)
//! against a fixed key without panicking, and its signed part must be exactly what
//! `sign_raw` produces from the decoded header and payload (the encoding is canonical).

#![no_main]

use libfuzzer_sys::fuzz_target;
use molt_protocol::envelope::{self, EnvelopeView};
use molt_protocol::keys::SIGNATURE_LEN;
use molt_protocol_fuzz::sender_key;

fuzz_target!(|data: &[u8]| {
    let Ok(view) = EnvelopeView::decode(data) else { return };
    let _ = view.verify(&sender_key().public_key());
    let signed = view.signed_bytes();
    assert_eq!(signed.len() + SIGNATURE_LEN, data.len());
    assert_eq!(signed, &data[..signed.len()]);
    let resigned = envelope::sign_raw(&view.header, view.payload, sender_key()).expect("decoded envelope re-encodes");
    assert_eq!(&resigned[..signed.len()], signed);
    let again = EnvelopeView::decode(&resigned).expect("re-encoded envelope decodes");
    assert_eq!(again.header, view.header);
    assert_eq!(again.payload, view.payload);
    again.verify(&sender_key().public_key()).expect("re-signed envelope verifies");
});
