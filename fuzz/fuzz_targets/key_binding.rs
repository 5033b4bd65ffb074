//! `KeyBinding::decode` on arbitrary bytes: a decoded binding re-encodes to the same bytes
//! and verifying it against a fixed key does not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use molt_protocol::keys::KeyBinding;
use molt_protocol_fuzz::sender_key;

fuzz_target!(|data: &[u8]| {
    let Ok(binding) = KeyBinding::decode(data) else { return };
    let _ = binding.verify(&sender_key().public_key());
    let encoded = binding.encode();
    assert_eq!(encoded, data);
    assert_eq!(KeyBinding::decode(&encoded), Ok(binding));
});
