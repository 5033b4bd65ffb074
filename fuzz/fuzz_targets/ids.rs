//! `AgentId`, `EdgeId` and `MessageId` parsing on arbitrary UTF-8: every accepted text is
//! the canonical form, so displaying the parsed id gives the input back exactly.

#![no_main]

use std::fmt::Display;
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use molt_protocol::{AgentId, EdgeId, MessageId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    assert_canonical::<AgentId>(text);
    assert_canonical::<EdgeId>(text);
    assert_canonical::<MessageId>(text);
});

fn assert_canonical<Id: FromStr + Display>(text: &str) {
    if let Ok(id) = text.parse::<Id>() {
        assert_eq!(id.to_string(), text);
    }
}
