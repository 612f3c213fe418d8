//! The envelope's fast path: `oslo.message` unescaped in one pass, for the usual envelope only.

/// The envelope as oslo.messaging writes it: `{"oslo.version": "…", "oslo.message": "…"}`,
/// those two keys once each in either order, and no `\u` escape. It is read in one pass that
/// unescapes `oslo.message` straight into its own buffer; that string is most of every body,
/// and serde's reader restarts its scan at each of its many `\"`.
///
/// `None` for any other body, valid or not: serde then reads it, accepting and rejecting
/// exactly what it always did, with its own error messages. So for every body this returns,
/// serde would have read the same two strings.
pub(super) fn usual_envelope(body: &[u8]) -> Option<(String, String)> {
    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    }
    fn expect(b: &[u8], i: usize, byte: u8) -> Option<usize> {
        let i = skip_ws(b, i);
        (b.get(i) == Some(&byte)).then_some(i + 1)
    }
    let (mut version, mut message) = (None, None);
    let mut i = expect(body, 0, b'{')?;
    for n in 0..2 {
        if n == 1 {
            i = expect(body, i, b',')?;
        }
        i = expect(body, i, b'"')?;
        let key = match body.get(i..i + 13)? {
            b"oslo.version\"" => &mut version,
            b"oslo.message\"" => &mut message,
            _ => return None,
        };
        i = expect(body, i + 13, b':')?;
        i = expect(body, i, b'"')?;
        if key.is_some() {
            return None;
        }
        let (text, read) = unescape(&body[i..])?;
        *key = Some(text);
        i += read;
    }
    i = expect(body, i, b'}')?;
    (skip_ws(body, i) == body.len()).then_some((version?, message?))
}

/// Unescapes a JSON string's content, `text` starting after its opening quote: the string and
/// the length read, closing quote included. `None` for a `\u` escape (left to serde, which
/// pairs surrogates), a control character, an unknown escape, no closing quote or bad UTF-8.
pub(super) fn unescape(text: &[u8]) -> Option<(String, usize)> {
    // The output is never longer than the input; the margin lets every copy be a whole word,
    // of which only the bytes before a special one are kept.
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut i = 0;
    loop {
        while let Some(chunk) = text.get(i..i + 8) {
            let word: [u8; 8] = chunk.try_into().ok()?;
            out.extend_from_slice(&word);
            match first_special(u64::from_le_bytes(word)) {
                None => i += 8,
                Some(k) => {
                    out.truncate(out.len() - (8 - k));
                    i += k;
                    break;
                }
            }
        }
        let byte = match *text.get(i)? {
            b'"' => return String::from_utf8(out).ok().map(|s| (s, i + 1)),
            b'\\' => {
                i += 2;
                match text.get(i - 1)? {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'/' => b'/',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    _ => return None,
                }
            }
            0..=0x1f => return None,
            b => {
                i += 1;
                b
            }
        };
        out.push(byte);
    }
}

/// The index of the first `"`, `\\` or control character among eight bytes (little-endian).
/// Each test sets the high bit of the bytes that match; a borrow can only mark bytes above a
/// true match, so the lowest mark is exact.
pub(super) fn first_special(word: u64) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let mask =
        below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1) | below(word, 0x20);
    (mask != 0).then(|| mask.trailing_zeros() as usize / 8)
}
