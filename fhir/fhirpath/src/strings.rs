//! `encode`/`decode` (base64, urlbase64, hex) and `escape`/`unescape` (html, json).

use base64::Engine;

pub(crate) fn transform(function: &str, format: &str, s: &str) -> Option<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    match (function, format) {
        ("encode", "base64") => Some(STANDARD.encode(s.as_bytes())),
        ("encode", "urlbase64") => Some(URL_SAFE.encode(s.as_bytes())),
        ("encode", "hex") => Some(s.bytes().map(|b| format!("{b:02x}")).collect()),
        ("decode", "base64") => String::from_utf8(STANDARD.decode(s).ok()?).ok(),
        ("decode", "urlbase64") => String::from_utf8(URL_SAFE.decode(s).ok()?).ok(),
        ("decode", "hex") => {
            if !s.len().is_multiple_of(2) || !s.is_ascii() {
                return None;
            }
            let bytes: Option<Vec<u8>> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
                .collect();
            String::from_utf8(bytes?).ok()
        }
        ("escape", "html") => {
            let mut out = String::with_capacity(s.len());
            for c in s.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
            Some(out)
        }
        ("unescape", "html") => Some(
            s.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        ),
        ("escape", "json") => {
            let quoted = serde_json::to_string(s).ok()?;
            Some(quoted[1..quoted.len() - 1].to_string())
        }
        ("unescape", "json") => {
            let mut out = String::with_capacity(s.len());
            let mut chars = s.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    out.push(c);
                    continue;
                }
                match chars.next()? {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    other => out.push(other),
                }
            }
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::transform;

    #[test]
    fn round_trips() {
        assert_eq!(transform("encode", "base64", "test").unwrap(), "dGVzdA==");
        assert_eq!(transform("decode", "hex", "74657374").unwrap(), "test");
        assert_eq!(
            transform("encode", "urlbase64", "subjects?_d").unwrap(),
            "c3ViamVjdHM_X2Q="
        );
        assert_eq!(
            transform("escape", "html", "\"1<2\"").unwrap(),
            "&quot;1&lt;2&quot;"
        );
        assert_eq!(
            transform("unescape", "json", "\\\"1<2\\\"").unwrap(),
            "\"1<2\""
        );
        assert!(transform("encode", "rot13", "x").is_none());
    }
}
