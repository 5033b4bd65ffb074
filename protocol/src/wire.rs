//! Byte-level reading and writing shared by every decoder: big-endian integers, fixed
//! arrays, length-prefixed byte strings. Every read is bounds-checked and returns a typed
//! error; nothing here can panic on input.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("input truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("{trailing} unexpected trailing bytes")]
    TrailingBytes { trailing: usize },
    #[error("length {length} exceeds the limit of {limit}")]
    TooLong { length: usize, limit: usize },
}

#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, offset: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    pub(crate) fn take(&mut self, count: usize) -> Result<&'a [u8], WireError> {
        let remaining = self.bytes.len() - self.offset;
        if count > remaining {
            return Err(WireError::Truncated { offset: self.offset, needed: count - remaining });
        }
        let slice = &self.bytes[self.offset..self.offset + count];
        self.offset += count;
        Ok(slice)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let slice = self.take(N)?;
        let mut array = [0u8; N];
        array.copy_from_slice(slice);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A byte string with a u32 length prefix, at most `limit` bytes.
    pub(crate) fn bytes_u32(&mut self, limit: usize) -> Result<&'a [u8], WireError> {
        let length = self.u32()? as usize;
        if length > limit {
            return Err(WireError::TooLong { length, limit });
        }
        self.take(length)
    }

    /// A byte string with a u16 length prefix, at most `limit` bytes.
    pub(crate) fn bytes_u16(&mut self, limit: usize) -> Result<&'a [u8], WireError> {
        let length = self.u16()? as usize;
        if length > limit {
            return Err(WireError::TooLong { length, limit });
        }
        self.take(length)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.offset..];
        self.offset = self.bytes.len();
        rest
    }

    pub(crate) fn finish(&self) -> Result<(), WireError> {
        match self.bytes.len() - self.offset {
            0 => Ok(()),
            trailing => Err(WireError::TrailingBytes { trailing }),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Writer {
        Writer { bytes: Vec::with_capacity(capacity) }
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(crate) fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    /// Callers bound `bytes` by a limit that fits in u32 (checked at compile time in
    /// `limits`).
    pub(crate) fn bytes_u32(&mut self, bytes: &[u8]) {
        self.u32(bytes.len() as u32);
        self.bytes(bytes);
    }

    pub(crate) fn bytes_u16(&mut self, bytes: &[u8]) {
        self.u16(bytes.len() as u16);
        self.bytes(bytes);
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.bytes
    }
}
