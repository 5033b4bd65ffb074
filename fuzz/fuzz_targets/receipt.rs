//! `Receipt::decode` on arbitrary bytes: a decoded receipt re-encodes to the same bytes
//! and verifying it against a fixed key does not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use molt_protocol::receipt::Receipt;
use molt_protocol_fuzz::sender_key;

fuzz_target!(|data: &[u8]| {
    let Ok(receipt) = Receipt::decode(data) else { return };
    let _ = receipt.verify(&sender_key().public_key());
    let encoded = receipt.encode();
    assert_eq!(encoded, data);
    assert_eq!(Receipt::decode(&encoded), Ok(receipt));
});
