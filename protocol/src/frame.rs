//! Frames: how envelopes, receipts and control messages travel on a QUIC stream.
//!
//! Each frame is `length u32 | type u8 | body`, the length counting type and body and
//! never exceeding [`MAX_FRAME_BYTES`]. [`FrameReader`] is a sans-IO incremental decoder:
//! feed it whatever the stream returned and take complete frames out. A length over the
//! limit is refused before any allocation; a body that does not parse is a typed error.

use crate::ids::MessageId;
use crate::limits::{MAX_ENVELOPE_BYTES, MAX_ERROR_DETAIL_BYTES, MAX_FRAME_BYTES};
use crate::receipt::RECEIPT_LEN;
use crate::wire::{Reader, WireError, Writer};

const TYPE_SEND: u8 = 1;
const TYPE_DELIVER: u8 = 2;
const TYPE_ACCEPTED: u8 = 3;
const TYPE_REJECTED: u8 = 4;
const TYPE_RECEIPT: u8 = 5;
const TYPE_GO_AWAY: u8 = 6;
const TYPE_PING: u8 = 7;
const TYPE_PONG: u8 = 8;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// What the edge did with an accepted message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Handed to the recipient's live connection; its receipt will follow.
    Forwarded = 1,
    /// Written durably (fsynced) to the offline queue.
    Stored = 2,
}

/// Why the edge refused a message. Stable numbers on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectCode {
    Malformed = 1,
    BadSignature = 2,
    SenderMismatch = 3,
    Expired = 4,
    FromFuture = 5,
    Duplicate = 6,
    RateLimited = 7,
    QueueFull = 8,
    TooLarge = 9,
    TooOld = 10,
    ShuttingDown = 11,
    Internal = 12,
    NotRecipient = 13,
    Unknown = 0xffff,
}

impl RejectCode {
    fn from_wire(code: u16) -> RejectCode {
        match code {
            1 => RejectCode::Malformed,
            2 => RejectCode::BadSignature,
            3 => RejectCode::SenderMismatch,
            4 => RejectCode::Expired,
            5 => RejectCode::FromFuture,
            6 => RejectCode::Duplicate,
            7 => RejectCode::RateLimited,
            8 => RejectCode::QueueFull,
            9 => RejectCode::TooLarge,
            10 => RejectCode::TooOld,
            11 => RejectCode::ShuttingDown,
            12 => RejectCode::Internal,
            13 => RejectCode::NotRecipient,
            _ => RejectCode::Unknown,
        }
    }

    /// Whether sending the same message again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            RejectCode::RateLimited | RejectCode::QueueFull | RejectCode::ShuttingDown | RejectCode::Internal
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Agent → edge: an encoded envelope.
    Send(Vec<u8>),
    /// Edge → agent: an encoded envelope for this agent.
    Deliver(Vec<u8>),
    /// Edge → agent: the message was taken.
    Accepted {
        message_id: MessageId,
        disposition: Disposition,
    },
    /// Edge → agent: the message was refused. The id is all zero when the frame could not
    /// be read far enough to know it.
    Rejected {
        message_id: MessageId,
        code: RejectCode,
        detail: String,
    },
    /// Both ways: an encoded, signed delivery receipt.
    Receipt(Vec<u8>),
    /// Edge → agent: the edge is going away; reconnect after the delay.
    GoAway {
        reconnect_after_ms: u32,
        detail: String,
    },
    Ping(u64),
    Pong(u64),
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame length {length} exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge { length: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed frame body: {0}")]
    Malformed(#[from] WireError),
    #[error("unknown disposition {0}")]
    BadDisposition(u8),
    #[error("frame text is not utf-8")]
    NotUtf8,
}

impl Frame {
    /// Appends the encoded frame (with its length prefix) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut body = Writer::with_capacity(self.body_len_hint());
        match self {
            Frame::Send(envelope) => {
                body.u8(TYPE_SEND);
                body.bytes(envelope);
            }
            Frame::Deliver(envelope) => {
                body.u8(TYPE_DELIVER);
                body.bytes(envelope);
            }
            Frame::Accepted { message_id, disposition } => {
                body.u8(TYPE_ACCEPTED);
                body.bytes(message_id.as_bytes());
                body.u8(*disposition as u8);
            }
            Frame::Rejected { message_id, code, detail } => {
                body.u8(TYPE_REJECTED);
                body.bytes(message_id.as_bytes());
                body.u16(*code as u16);
                body.bytes_u16(truncate_utf8(detail, MAX_ERROR_DETAIL_BYTES).as_bytes());
            }
            Frame::Receipt(receipt) => {
                body.u8(TYPE_RECEIPT);
                body.bytes(receipt);
            }
            Frame::GoAway { reconnect_after_ms, detail } => {
                body.u8(TYPE_GO_AWAY);
                body.u32(*reconnect_after_ms);
                body.bytes_u16(truncate_utf8(detail, MAX_ERROR_DETAIL_BYTES).as_bytes());
            }
            Frame::Ping(nonce) => {
                body.u8(TYPE_PING);
                body.u64(*nonce);
            }
            Frame::Pong(nonce) => {
                body.u8(TYPE_PONG);
                body.u64(*nonce);
            }
        }
        let body = body.into_vec();
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes one frame body (without its length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        if body.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge { length: body.len() });
        }
        let mut reader = Reader::new(body);
        let kind = reader.u8().map_err(|_| FrameError::Empty)?;
        let frame = match kind {
            TYPE_SEND => Frame::Send(bounded(reader.rest(), MAX_ENVELOPE_BYTES)?.to_vec()),
            TYPE_DELIVER => Frame::Deliver(bounded(reader.rest(), MAX_ENVELOPE_BYTES)?.to_vec()),
            TYPE_ACCEPTED => {
                let message_id = MessageId::from_bytes(reader.array()?);
                let disposition = match reader.u8()? {
                    1 => Disposition::Forwarded,
                    2 => Disposition::Stored,
                    other => return Err(FrameError::BadDisposition(other)),
                };
                Frame::Accepted { message_id, disposition }
            }
            TYPE_REJECTED => {
                let message_id = MessageId::from_bytes(reader.array()?);
                let code = RejectCode::from_wire(reader.u16()?);
                let detail = utf8(reader.bytes_u16(MAX_ERROR_DETAIL_BYTES)?)?;
                Frame::Rejected { message_id, code, detail }
            }
            TYPE_RECEIPT => Frame::Receipt(bounded(reader.rest(), RECEIPT_LEN)?.to_vec()),
            TYPE_GO_AWAY => {
                let reconnect_after_ms = reader.u32()?;
                let detail = utf8(reader.bytes_u16(MAX_ERROR_DETAIL_BYTES)?)?;
                Frame::GoAway { reconnect_after_ms, detail }
            }
            TYPE_PING => Frame::Ping(reader.u64()?),
            TYPE_PONG => Frame::Pong(reader.u64()?),
            other => return Err(FrameError::UnknownType(other)),
        };
        reader.finish()?;
        Ok(frame)
    }

    fn body_len_hint(&self) -> usize {
        match self {
            Frame::Send(bytes) | Frame::Deliver(bytes) | Frame::Receipt(bytes) => 1 + bytes.len(),
            _ => 64,
        }
    }
}

/// Incremental frame decoder over a byte stream.
#[derive(Debug, Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
    start: usize,
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet form a complete frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// stream cannot be resynchronised and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let pending = &self.buffer[self.start..];
        if pending.len() < LENGTH_PREFIX_LEN {
            self.compact();
            return Ok(None);
        }
        let length = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge { length });
        }
        if pending.len() < LENGTH_PREFIX_LEN + length {
            self.compact();
            return Ok(None);
        }
        let body = &pending[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + length];
        let frame = Frame::decode_body(body);
        self.start += LENGTH_PREFIX_LEN + length;
        frame.map(Some)
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }
}

fn bounded(bytes: &[u8], limit: usize) -> Result<&[u8], FrameError> {
    if bytes.len() > limit {
        return Err(FrameError::Malformed(WireError::TooLong { length: bytes.len(), limit }));
    }
    Ok(bytes)
}

fn utf8(bytes: &[u8]) -> Result<String, FrameError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8)
}

fn truncate_utf8(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..300);
        let text = "[a-zé ]{0,40}";
        prop_oneof![
            bytes.clone().prop_map(Frame::Send),
            bytes.clone().prop_map(Frame::Deliver),
            (any::<[u8; 16]>(), any::<bool>()).prop_map(|(id, stored)| Frame::Accepted {
                message_id: MessageId::from_bytes(id),
                disposition: if stored { Disposition::Stored } else { Disposition::Forwarded },
            }),
            (any::<[u8; 16]>(), 1u16..=13, text).prop_map(|(id, code, detail)| Frame::Rejected {
                message_id: MessageId::from_bytes(id),
                code: RejectCode::from_wire(code),
                detail,
            }),
            proptest::collection::vec(any::<u8>(), 0..=RECEIPT_LEN).prop_map(Frame::Receipt),
            (any::<u32>(), text).prop_map(|(ms, detail)| Frame::GoAway { reconnect_after_ms: ms, detail }),
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_any_chunking(frames in proptest::collection::vec(frame_strategy(), 1..20), chunk in 1usize..64) {
            let mut wire = Vec::new();
            for frame in &frames {
                frame.encode_into(&mut wire);
            }
            let mut reader = FrameReader::new();
            let mut decoded = Vec::new();
            for piece in wire.chunks(chunk) {
                reader.extend(piece);
                while let Some(frame) = reader.next_frame().unwrap() {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert_eq!(reader.buffered(), 0);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut reader = FrameReader::new();
            reader.extend(&bytes);
            for _ in 0..100 {
                match reader.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = Frame::decode_body(&bytes);
        }
    }

    #[test]
    fn oversize_length_is_refused_before_buffering_the_body() {
        let mut reader = FrameReader::new();
        reader.extend(&((MAX_FRAME_BYTES + 1) as u32).to_be_bytes());
        assert_eq!(reader.next_frame(), Err(FrameError::TooLarge { length: MAX_FRAME_BYTES + 1 }));
    }

    #[test]
    fn malformed_bodies_get_typed_errors() {
        assert_eq!(Frame::decode_body(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode_body(&[99]), Err(FrameError::UnknownType(99)));
        assert!(matches!(Frame::decode_body(&[TYPE_ACCEPTED, 1, 2]), Err(FrameError::Malformed(_))));
        let mut accepted = vec![TYPE_ACCEPTED];
        accepted.extend_from_slice(&[0; 16]);
        accepted.push(7);
        assert_eq!(Frame::decode_body(&accepted), Err(FrameError::BadDisposition(7)));
        let mut ping = vec![TYPE_PING];
        ping.extend_from_slice(&[0; 9]);
        assert!(matches!(Frame::decode_body(&ping), Err(FrameError::Malformed(WireError::TrailingBytes { .. }))));
        let mut rejected = vec![TYPE_REJECTED];
        rejected.extend_from_slice(&[0; 16]);
        rejected.extend_from_slice(&1u16.to_be_bytes());
        rejected.extend_from_slice(&2u16.to_be_bytes());
        rejected.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(Frame::decode_body(&rejected), Err(FrameError::NotUtf8));
        let mut receipt = vec![TYPE_RECEIPT];
        receipt.extend_from_slice(&[0; RECEIPT_LEN + 1]);
        assert!(matches!(Frame::decode_body(&receipt), Err(FrameError::Malformed(WireError::TooLong { .. }))));
    }

    #[test]
    fn long_details_are_truncated_on_a_char_boundary() {
        let detail = "é".repeat(MAX_ERROR_DETAIL_BYTES);
        let frame = Frame::Rejected { message_id: MessageId::from_bytes([0; 16]), code: RejectCode::Internal, detail };
        let wire = frame.encode();
        let decoded = Frame::decode_body(&wire[4..]).unwrap();
        let Frame::Rejected { detail, .. } = decoded else { panic!("wrong frame") };
        assert!(detail.len() <= MAX_ERROR_DETAIL_BYTES);
    }
}
