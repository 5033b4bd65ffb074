//! `FrameReader` on arbitrary bytes fed in two chunks (split at the first byte's value),
//! and `Frame::decode_body` on the whole input. Every decoded frame must re-encode and
//! decode to an equal frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use molt_protocol::frame::{Frame, FrameReader, LENGTH_PREFIX_LEN};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |first| usize::from(*first)).min(data.len());
    let (head, tail) = data.split_at(split);
    let mut reader = FrameReader::new();
    reader.extend(head);
    // After an error the stream is dead: feeding it more is not part of the contract.
    if drain(&mut reader) {
        reader.extend(tail);
        drain(&mut reader);
    }
    assert!(reader.buffered() <= data.len());
    if let Ok(frame) = Frame::decode_body(data) {
        assert_round_trips(&frame);
    }
});

/// Pulls frames until more bytes are needed (`true`) or the stream fails (`false`).
fn drain(reader: &mut FrameReader) -> bool {
    loop {
        match reader.next_frame() {
            Ok(Some(frame)) => assert_round_trips(&frame),
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fn assert_round_trips(frame: &Frame) {
    let wire = frame.encode();
    let length = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
    assert_eq!(length + LENGTH_PREFIX_LEN, wire.len());
    assert_eq!(Frame::decode_body(&wire[LENGTH_PREFIX_LEN..]).as_ref(), Ok(frame));
    let mut reader = FrameReader::new();
    reader.extend(&wire);
    assert_eq!(reader.next_frame().as_ref(), Ok(&Some(frame.clone())));
    assert_eq!(reader.buffered(), 0);
    assert_eq!(reader.next_frame(), Ok(None));
}
