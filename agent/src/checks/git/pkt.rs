//! pkt-line framing of the git wire protocol: four hex digits giving the length of the line
//! including themselves, then the payload. `0000` is a flush, and protocol v2 adds `0001`
//! (delimiter) and `0002` (response end).

use std::io::{self, Read};

/// Largest pkt-line, length prefix included.
pub(crate) const MAX_PKT_LEN: usize = 65520;

/// One pkt-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pkt {
    /// `0000`: end of a section or message.
    Flush,
    /// `0001`: separates sections of a v2 command.
    Delim,
    /// `0002`: end of a v2 response (stateless connections).
    ResponseEnd,
    /// A payload line.
    Data(Vec<u8>),
}

impl Pkt {
    /// The payload without its trailing newline, for data lines.
    pub(crate) fn text(&self) -> Option<&[u8]> {
        match self {
            Self::Data(d) => Some(d.strip_suffix(b"\n").unwrap_or(d)),
            _ => None,
        }
    }
}

/// Why reading pkt-lines failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PktError {
    /// The underlying stream failed (or ended early).
    #[error("the connection to the server failed: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not pkt-lines at all.
    #[error("not a git pkt-line: {0}")]
    Malformed(String),
}

/// Reads pkt-lines one at a time from a stream.
pub(crate) struct PktReader<R> {
    inner: R,
}

impl<R: Read> PktReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner }
    }

    /// Reads the next pkt-line.
    pub(crate) fn read(&mut self) -> Result<Pkt, PktError> {
        let mut head = [0u8; 4];
        self.inner.read_exact(&mut head)?;
        let len = parse_len(&head)?;
        match len {
            0 => Ok(Pkt::Flush),
            1 => Ok(Pkt::Delim),
            2 => Ok(Pkt::ResponseEnd),
            3 => Err(PktError::Malformed("length 0003 is reserved".into())),
            n if n > MAX_PKT_LEN => Err(PktError::Malformed(format!(
                "line length {n} is above the maximum {MAX_PKT_LEN}"
            ))),
            n => {
                let mut data = vec![0u8; n - 4];
                self.inner.read_exact(&mut data)?;
                Ok(Pkt::Data(data))
            }
        }
    }
}

fn parse_len(head: &[u8; 4]) -> Result<usize, PktError> {
    let text = std::str::from_utf8(head)
        .ok()
        .filter(|t| t.bytes().all(|b| b.is_ascii_hexdigit()));
    match text.and_then(|t| usize::from_str_radix(t, 16).ok()) {
        Some(n) => Ok(n),
        None => Err(PktError::Malformed(format!(
            "length prefix {:?}",
            String::from_utf8_lossy(head)
        ))),
    }
}

/// Appends `data` as one pkt-line.
pub(crate) fn write_data(out: &mut Vec<u8>, data: &[u8]) -> Result<(), PktError> {
    let len = data.len() + 4;
    if len > MAX_PKT_LEN {
        return Err(PktError::Malformed(format!(
            "line of {len} bytes is above the maximum {MAX_PKT_LEN}"
        )));
    }
    out.extend_from_slice(format!("{len:04x}").as_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Appends a flush-pkt.
pub(crate) fn write_flush(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0000");
}

/// Appends a delim-pkt.
pub(crate) fn write_delim(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0001");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Vec<Result<Pkt, String>> {
        let mut r = PktReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.read() {
                Ok(p) => out.push(Ok(p)),
                Err(PktError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn reads_data_and_special_lines() {
        let got = read_all(b"000bversion0000000100020006a\n");
        assert_eq!(
            got,
            vec![
                Ok(Pkt::Data(b"version".to_vec())),
                Ok(Pkt::Flush),
                Ok(Pkt::Delim),
                Ok(Pkt::ResponseEnd),
                Ok(Pkt::Data(b"a\n".to_vec())),
            ]
        );
        assert_eq!(Pkt::Data(b"a\n".to_vec()).text(), Some(&b"a"[..]));
        assert_eq!(Pkt::Flush.text(), None);
    }

    #[test]
    fn uppercase_hex_lengths_are_accepted() {
        let mut line = b"001A".to_vec();
        line.extend_from_slice(&[b'x'; 22]);
        assert_eq!(read_all(&line), vec![Ok(Pkt::Data(vec![b'x'; 22]))]);
    }

    #[test]
    fn html_is_not_pkt_lines() {
        let got = read_all(b"<!DOCTYPE html><html>");
        assert_eq!(got.len(), 1);
        let err = got[0].clone().unwrap_err();
        assert!(err.contains("\"<!DO\""), "{err}");
    }

    #[test]
    fn reserved_and_oversized_lengths_are_rejected() {
        assert!(read_all(b"0003")[0].is_err());
        assert!(read_all(b"fff1")[0].is_err());
    }

    #[test]
    fn a_truncated_line_is_an_io_error() {
        let mut r = PktReader::new(&b"0010abc"[..]);
        assert!(matches!(r.read(), Err(PktError::Io(_))));
    }

    #[test]
    fn writes_round_trip() {
        let mut out = Vec::new();
        write_data(&mut out, b"command=ls-refs\n").unwrap();
        write_delim(&mut out);
        write_data(&mut out, b"peel\n").unwrap();
        write_flush(&mut out);
        assert_eq!(out, b"0014command=ls-refs\n00010009peel\n0000");
        assert!(write_data(&mut Vec::new(), &vec![0u8; MAX_PKT_LEN]).is_err());
    }
}
